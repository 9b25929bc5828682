"""torch.distributed for training: the process group torchrun describes, FSDP2 sharding, and the few
collectives the trainer needs. A single process (no WORLD_SIZE > 1) runs everything as plain calls."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from promptcot_engine.train.loss_head import CausalLMLoss


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def training_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun on a GPU node, else cuda or cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun (or the caller) set up; NCCL on GPUs, gloo on CPUs."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Left to the interpreter's teardown, gloo's worker threads are destroyed while still joinable and the
    # process aborts (SIGABRT, "terminate called without an active exception") after its work is done.
    atexit.register(_leave_process_group)
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(loss_module: CausalLMLoss) -> None:
    """FSDP2: each decoder layer is its own unit (gathered just for its forward and backward), the
    embeddings, final norm and LM head (tied or not) belong to the root unit."""
    from torch.distributed.fsdp import fully_shard

    layers = loss_module.model.model.layers
    for i, layer in enumerate(layers):
        # the last layer's backward starts right after the forward: keep it gathered
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1)
    fully_shard(loss_module)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, ctx: DistributedContext) -> list:
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def full_model_state_dict(loss_module: CausalLMLoss, cpu_offload: bool) -> dict[str, torch.Tensor]:
    """The decoder's full (unsharded) state dict under transformers' names. With cpu_offload only rank 0
    gets it (the others get {}); without, every rank does, on its device."""
    state = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def full_optimizer_state_dict(loss_module: CausalLMLoss, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(loss_module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(loss_module: CausalLMLoss, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(loss_module, optimizer, state, options=StateDictOptions(full_state_dict=True))
