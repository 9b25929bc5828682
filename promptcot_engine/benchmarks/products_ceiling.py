"""The generate benchmark against the machine's limit, not only against transformers.

Sampling from a decoder is, at its least, the model's matrix products: one row through every linear layer
per prompt token and per generated token, the LM head for each sampled position. Timing exactly those
products on this machine, as the engine runs them (its own layers, on decode-sized batches), gives a
ceiling measured in the same run: the engine's model FLOP/s over it is its fraction of the machine (what
MFU says on a GPU), and transformers' time over the products' time is the most any implementation of the
same products could gain over it here (everything else, attention included, free).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from promptcot_engine.kernels.cpu_linear import MERGED_GROUPS, MergedProducts


def _linear_weights(model: nn.Module) -> dict[nn.Linear, int]:
    """Every linear layer (the LM head included) with its weight's size: the FLOPs of one row are twice their sum."""
    return {m: m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)}


def products_flops(model: nn.Module, prompt_lens: list[int], n: int, tokens: int) -> int:
    """FLOPs of the matrix products the sampling needs at least: each prompt's tokens once (its n samples share
    them), each sample's generated tokens but the last (a token is read by the next step), and the LM head
    at each sampled position (a prompt's last position once for its n samples)."""
    samples = len(prompt_lens) * n
    weights = _linear_weights(model)
    head = weights[model.lm_head]
    body = sum(weights.values()) - head
    body_rows = sum(prompt_lens) + tokens - samples
    head_rows = len(prompt_lens) + tokens - samples
    return 2 * (body_rows * body + head_rows * head)


def engine_products(model: nn.Module) -> list[tuple[object, int]]:
    """The model's products as the engine calls them, each with its input width: a merged group (the `qkv` and
    `gate_up` hooks on CPU, kernels/cpu_linear.py) as its one call, every other linear layer as itself."""
    calls, merged = [], set()
    for module in model.modules():
        for hook in MERGED_GROUPS:
            group = module.__dict__.get(hook)  # installed on the instance; the class's own method otherwise
            if isinstance(group, MergedProducts):
                calls.append((group, group.layers[0].in_features))
                merged.update(group.layers)
    return calls + [(m, m.in_features) for m in _linear_weights(model) if m not in merged]


@torch.inference_mode()
def products_ceiling(model: nn.Module, rows: int, repeats: int = 3) -> float:
    """FLOP/s of the model's linear layers (the LM head included) on `rows` rows, best of `repeats` passes:
    every product in turn, so that each reads its weight from memory as a decode step does."""
    param = next(model.parameters())
    calls = engine_products(model)
    inputs = {width: torch.randn(rows, width, dtype=param.dtype, device=param.device) for _, width in calls}
    flops = 2 * rows * sum(_linear_weights(model).values())
    seconds = []
    for _ in range(repeats + 1):  # the first pass warms up (oneDNN primitives, CUDA kernels)
        if param.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for product, width in calls:
            product(inputs[width])
        if param.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return flops / min(seconds[1:])
