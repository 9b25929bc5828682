"""FSDP2 over two CPU processes (gloo): the same losses and final weights as one process on the same
global batches, checkpoints written from the shards, and a sharded resume that continues the curve."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from promptcot_engine.models.loader import load_model
from promptcot_engine.train import TrainConfig, Trainer
from tests.tiny_checkpoints import tiny_checkpoint

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Find the number of positive integers n.",
    "def solve(n): return sum(range(n))", "Foundational Concepts: Modular arithmetic",
    "In triangle ABC, AB = 13 and BC = 14.", "Compute the area, then the inradius r.",
    "Let x be a real number such that x^2 = 4.", "Difficulty Level: AIME", "print(solve(10))",
]


def records(objective):
    if objective == "sft":
        return [{"prompt": s[:10], "completion": s[10:]} for s in SENTENCES]
    return [{"prompt": s[:10], "chosen": s[10:], "rejected": s[10:][::-1]} for s in SENTENCES]


def config(objective, output_dir):
    # 9 examples in global batches of 4: the third step has one example, so one rank only pads
    return TrainConfig(objective=objective, lr=1e-3, epochs=2, batch_size=4, grad_accum=2, warmup=1,
                       max_grad_norm=1.0, save_steps=3, output_dir=str(output_dir))


def _worker(rank, world_size, port, objective, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        trainer = Trainer.from_pretrained(tiny_checkpoint("llama"), config(objective, out_dir / "run"), device="cpu")
        assert trainer.dist.world_size == world_size and trainer.dist.rank == rank
        losses = [m["loss"] for m in trainer.train(records(objective), use_tqdm=False)["history"]]
        full = {k: v.detach().cpu() for k, v in trainer.full_state_dict().items()}
        checkpoint = out_dir / "run" / "checkpoint-3"
        resumed = Trainer.from_pretrained(checkpoint, config(objective, out_dir / "resumed"), device="cpu")
        resumed_losses = [m["loss"] for m in resumed.train(records(objective), resume_from=checkpoint,
                                                              use_tqdm=False)["history"]]
        if rank == 0:
            torch.save({"losses": losses, "resumed_losses": resumed_losses, "state": full}, out_dir / "result.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_fsdp2_on_two_processes_equals_one_process(tmp_path, objective):
    single = Trainer.from_pretrained(tiny_checkpoint("llama"), config(objective, tmp_path / "single"), device="cpu")
    single_losses = [m["loss"] for m in single.train(records(objective), use_tqdm=False)["history"]]

    mp.spawn(_worker, args=(2, free_port(), objective, tmp_path), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    assert result["losses"] == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    assert result["resumed_losses"] == pytest.approx(result["losses"][3:], rel=1e-6, abs=1e-7)
    single_state = single.model.state_dict()
    assert set(result["state"]) == set(single_state)
    written, _ = load_model(tmp_path / "run", dtype="float32", device="cpu")  # rank 0 wrote the gathered model
    for name, tensor in single_state.items():
        torch.testing.assert_close(result["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(written.state_dict()[name], result["state"][name]), name
