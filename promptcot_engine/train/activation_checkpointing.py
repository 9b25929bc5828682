"""Activation checkpointing applied from outside the model: each decoder layer's forward is routed
through torch.utils.checkpoint, and the layer's insides are recomputed in backward instead of kept.

"full" keeps only each layer's input and recomputes the whole layer (a third more compute). "selective"
keeps the outputs of the matrix products and of attention, and recomputes only the pointwise work
between them (norms, rotary embedding, SiLU, products, residual adds): about half the activation memory
for a few percent more time, since that work is cheap next to the products it sits between.

The layers are patched on the instance and restored afterwards; parameter names never change.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
_EXPENSIVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _expensive_ops() -> set:
    ops = set(_EXPENSIVE_OPS)
    try:  # flash-attn's varlen kernel, registered as a torch op once flash_attn is imported
        ops.add(torch.ops.flash_attn._flash_attn_varlen_forward.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


def _keep_expensive_outputs(expensive_ops: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in expensive_ops else CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def activation_checkpointing(layers: nn.ModuleList, mode: str = "full") -> Iterator[None]:
    if mode == "none":
        yield
        return
    # the model is deterministic (no dropout), so there is no RNG state to replay
    options = {"use_reentrant": False, "preserve_rng_state": False}
    if mode == "selective":
        policy = functools.partial(_keep_expensive_outputs, _expensive_ops())
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, **options)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
