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


@torch.inference_mode()
def products_ceiling(model: nn.Module, rows: int, repeats: int = 3) -> float:
    """FLOP/s of the model's linear layers (the LM head included) on `rows` rows, best of `repeats` passes:
    every layer in turn, so that each reads its weight from memory as a decode step does."""
    param = next(model.parameters())
    linears = _linear_weights(model)
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=param.dtype, device=param.device) for m in linears}
    flops = 2 * rows * sum(linears.values())
    seconds = []
    for _ in range(repeats + 1):  # the first pass warms up (oneDNN primitives, CUDA kernels)
        if param.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for m in linears:
            m(inputs[m.in_features])
        if param.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return flops / min(seconds[1:])
