"""The decoder's elementwise steps on CPU in C (csrc/cpu/layer_ops.c), through kernels/cpu_library.py: RMSNorm
and rotary embedding, one call each where torch runs several ops.

Each rounds where torch rounds, so bf16 results equal the model's torch code (models/decoder.py,
models/rope.py, the references) and fp32 results equal it up to the order of a sum.

`use_cpu_layer_kernels(model)` swaps them in for the engine's model on CPU, on the same parameters (the state
dict does not change); anything that needs a gradient, and any tensor they do not take, falls back to the
module's torch code. The trainer keeps torch's ops and their backward.
"""
from __future__ import annotations

import torch
from torch import nn

from promptcot_engine.kernels.cpu_library import DTYPE_CODES, library, takes
from promptcot_engine.kernels.cpu_linear import no_grad_wanted
from promptcot_engine.models.decoder import RMSNorm
from promptcot_engine.models.rope import RotaryEmbedding


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension (rows may be strided, the last dimension contiguous). With `residual`
    (contiguous, x's shape and dtype), x is first added to it in place and the sum is normalized."""
    hidden = x.shape[-1]
    # [rows, hidden] as it comes at decode: no reshape and no view back (each costs microseconds per call)
    rows = x if x.dim() == 2 else x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if residual is not None and not (residual.shape == x.shape and residual.dtype == x.dtype
                                     and residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    out = torch.empty(rows.shape, dtype=x.dtype)
    library.pce_cpu_rms_norm(rows.data_ptr(), None if residual is None else residual.data_ptr(),
                             weight.contiguous().data_ptr(), out.data_ptr(), rows.shape[0], hidden, rows.stride(0), eps,
                             DTYPE_CODES[x.dtype])
    return out if x.dim() == 2 else out.view(x.shape)


def rotary_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (strided tokens and heads; head_dim contiguous); cos, sin [T, head_dim]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, heads, head_dim = x.shape
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype)
    cos, sin = cos.contiguous(), sin.contiguous()
    library.pce_cpu_rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), tokens, heads, head_dim,
                           x.stride(0), x.stride(1), DTYPE_CODES[x.dtype])
    return out


class CPURMSNorm(RMSNorm):
    """RMSNorm computing with `rms_norm_cpu`, around an existing norm's weight (not a copy)."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            if takes(x, self.weight) and no_grad_wanted(x, self.weight):
                return rms_norm_cpu(x, self.weight, self.eps)
        elif (takes(x, residual, self.weight) and no_grad_wanted(x, residual, self.weight)
              and residual.shape == x.shape and residual.is_contiguous()):
            return rms_norm_cpu(x, self.weight, self.eps, residual), residual  # the sum, in place
        return super().forward(x, residual)


class CPURotaryEmbedding(RotaryEmbedding):
    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if takes(q, k, cos, sin) and no_grad_wanted(q, k):
            return rotary_cpu(q, cos, sin), rotary_cpu(k, cos, sin)
        return super().forward(q, k, cos, sin)


def use_cpu_layer_kernels(model: nn.Module) -> int:
    """Swap every RMSNorm and RotaryEmbedding of `model` for its CPU-kernel version, on the same parameters;
    returns how many. For models that only run inference on the CPU (the engine's)."""
    swaps = {RMSNorm: CPURMSNorm, RotaryEmbedding: lambda _: CPURotaryEmbedding()}
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in swaps:
                setattr(parent, name, swaps[type(child)](child))
                swapped += 1
    return swapped
