"""CPU matrix products on oneDNN's inner-product primitive instead of the BLAS behind F.linear.

On the project's CPU box (AMD EPYC with AVX-512 and AVX512-BF16, torch's MKL build) F.linear in fp32 runs
MKL's sgemm at about 130-150 GFLOP/s on 2 cores; oneDNN reaches about 185 on the same shapes (decode
batches of 128 rows, the 49,152-wide LM head, prefill chunks) with the plain weight, and about 210 with
the weight prepacked in its blocked layout (measured over 90 distinct weights, so none stays in cache);
in bf16 it gains a few percent. Both accumulate in fp32 with IEEE products: oneDNN's fp32 math mode stays
torch's default, no bf16 or tf32 rounding slips in.

- `cpu_linear(x, weight, bias)`: F.linear's contract, on oneDNN where it applies (CPU, fp32 or bf16, no
  gradient wanted). A weight given `prepack_weight` is multiplied in its packed copy; a packed copy that
  an in-place write (`load_weights`) has made stale is packed again on the next call, found by the
  parameter's version counter.
- `OneDNNLinear`: an nn.Linear whose forward is `cpu_linear`; `use_onednn_linear(model)` swaps it in for
  every nn.Linear of an inference model on the same parameters (the state dict is unchanged) and
  prepacks their weights: one more copy of them in memory, the price of the faster product.
- The reference is F.linear in float64 (`tests/kernels/test_cpu_linear.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# private ops of torch's oneDNN integration (torch is pinned): without them every product stays on F.linear
ONEDNN_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# the op's overload itself: calling through the packet resolves it again on every call
LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_AVAILABLE else None


def no_grad_wanted(*tensors: torch.Tensor) -> bool:
    """No gradient will flow through these: what an inference-only CPU kernel (no backward) requires."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ONEDNN_AVAILABLE and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in ONEDNN_DTYPES and no_grad_wanted(x, weight))


def prepack_weight(weight: torch.Tensor) -> None:
    """Keep a copy of `weight` in oneDNN's blocked layout on the tensor itself, with the version it was
    taken at."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    weight.onednn_packed = (weight._version, packed)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias, as F.linear; oneDNN where it applies (it has no backward, so
    anything that needs a gradient stays on F.linear)."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    packed = getattr(weight, "onednn_packed", None)
    if packed is not None and packed[0] != weight._version:
        prepack_weight(weight)  # written in place since it was packed
        packed = weight.onednn_packed
    return LINEAR_POINTWISE(x, weight if packed is None else packed[1], bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """nn.Linear computing with `cpu_linear`. Built around an existing layer's parameters, not copies."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        packed = getattr(weight, "onednn_packed", None)
        # the engine's path, checked in a few cheap attribute reads (a decode step makes seven products a
        # layer): a packed copy exists only where oneDNN applies to the weight; it must be current, and x of
        # its dtype on the CPU with no gradient wanted
        if (packed is not None and packed[0] == weight._version and x.dtype == weight.dtype and x.is_cpu
                and not torch.is_grad_enabled()):
            return LINEAR_POINTWISE(x, packed[1], self.bias, "none", [], "")
        return cpu_linear(x, weight, self.bias)


def use_onednn_linear(model: nn.Module) -> int:
    """Swap every nn.Linear of `model` for a OneDNNLinear on the same parameters and prepack their weights;
    returns how many. For models that only run inference on the CPU (the engine's): training keeps
    F.linear and its backward."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear(child))
                if ONEDNN_AVAILABLE and child.weight.dtype in ONEDNN_DTYPES:
                    prepack_weight(child.weight)
                swapped += 1
    return swapped
