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
- `MergedProducts`: the products that read the same input (an attention's q/k/v, an MLP's gate/up) as one
  product over their weights' rows concatenated and packed together, as vLLM's merged linear layers do;
  `use_onednn_linear` installs them through the model's `qkv` and `gate_up` hooks. One wider product
  instead of three or two: 460 against 485 us for q/k/v and 1155 against 1221 us for gate/up per layer
  (SmolLM2's shapes, 128 rows, bf16).
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


def inference_call(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The engine's call: x in the weight's dtype, on the CPU, no gradient wanted. A few cheap attribute reads
    (checked at every product of a decode step); `onednn_applies` is the full check."""
    return x.dtype == weight.dtype and x.is_cpu and not torch.is_grad_enabled()


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
        # the engine's path: a packed copy exists only where oneDNN applies to the weight, and it must be current
        if packed is not None and packed[0] == weight._version and inference_call(x, weight):
            return LINEAR_POINTWISE(x, packed[1], self.bias, "none", [], "")
        return cpu_linear(x, weight, self.bias)


class MergedProducts:
    """Callable as the model's `qkv` / `gate_up` hook: the outputs of several linear layers that read the same
    x, from one oneDNN product over their weights' rows concatenated (and biases, where they have them),
    packed once and packed again when any of them has been written in place since. Where oneDNN does not
    apply (a gradient wanted, another dtype or device), each layer computes its own."""

    def __init__(self, *layers: nn.Linear):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.packed_from: list[tuple[torch.Tensor, int]] = []  # each tensor packed, and its version then

    def _tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.weight, layer.bias) if t is not None]

    def _stale(self) -> bool:
        current = self._tensors()
        return len(current) != len(self.packed_from) or any(
            t is not now or version != now._version for (t, version), now in zip(self.packed_from, current))

    def _pack(self) -> None:
        weight = torch.cat([layer.weight.detach() for layer in self.layers])
        biases = [layer.bias for layer in self.layers]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.packed_from = [(t, t._version) for t in self._tensors()]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not inference_call(x, self.layers[0].weight):
            return tuple(layer(x) for layer in self.layers)
        if self._stale():  # written in place, or replaced, since it was packed
            self._pack()
        return LINEAR_POINTWISE(x, self.packed, self.bias, "none", [], "").split(self.sizes, dim=-1)


# the model's hooks (models/decoder.py) and the layers each one's products come from
MERGED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def merge_products(model: nn.Module) -> set[int]:
    """Install MergedProducts on every module with a MERGED_GROUPS hook whose layers oneDNN takes (one dtype,
    all with a bias or none); returns the ids of the weights merged (they need no packed copy of their own)."""
    merged = set()
    for module in model.modules():
        for hook, names in MERGED_GROUPS.items():
            if not hasattr(type(module), hook):
                continue
            layers = [getattr(module, name) for name in names]
            dtypes = {layer.weight.dtype for layer in layers}
            if (len(dtypes) == 1 and dtypes <= set(ONEDNN_DTYPES)
                    and len({layer.bias is None for layer in layers}) == 1):
                setattr(module, hook, MergedProducts(*layers))  # the instance's attribute before the class's method
                merged.update(id(layer.weight) for layer in layers)
    return merged


def use_onednn_linear(model: nn.Module) -> int:
    """Swap every nn.Linear of `model` for a OneDNNLinear on the same parameters, merge the products that read
    the same input, and prepack the weights of the rest; returns how many layers were swapped. For models
    that only run inference on the CPU (the engine's): training keeps F.linear and its backward."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                swapped.append(OneDNNLinear(child))
                setattr(parent, name, swapped[-1])
    merged = merge_products(model) if ONEDNN_AVAILABLE else set()
    for layer in swapped:
        if ONEDNN_AVAILABLE and layer.weight.dtype in ONEDNN_DTYPES and id(layer.weight) not in merged:
            prepack_weight(layer.weight)
    return len(swapped)
