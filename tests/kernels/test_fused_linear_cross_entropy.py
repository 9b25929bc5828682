"""Fused linear cross-entropy against F.linear + F.cross_entropy: loss, d(hidden), d(weight), every reduction,
odd shapes, ignored rows; the torch path in float64 / fp32 / bf16, the Triton kernel under TRITON_INTERPRET=1."""
import os

import pytest
import torch
import torch.nn.functional as F

from promptcot_engine.kernels.fused_linear_cross_entropy import (
    IGNORE_INDEX,
    REDUCTIONS,
    cross_entropy_grad_triton,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)

# a GPU run turns the interpreter off (TRITON_INTERPRET=0): the Triton kernel then runs compiled, on CUDA
KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"


def make_inputs(T, H, V, dtype, seed=0, ignored_every=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, V, (T,), generator=g)
    target[::ignored_every] = IGNORE_INDEX
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target, reduction, upstream_seed=1, device="cpu"):
    """The loss and both gradients, with a random upstream gradient so "none" weighs every row differently."""
    hidden = hidden.detach().to(device).requires_grad_()
    weight = weight.detach().to(device).requires_grad_()
    loss = fn(hidden, weight, target.to(device), reduction=reduction)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    loss.backward(upstream.to(device, loss.dtype))
    return loss.detach().cpu().double(), hidden.grad.cpu().double(), weight.grad.cpu().double()


def reference_in_float64(hidden, weight, target, reduction):
    return loss_and_grads(linear_cross_entropy_reference, hidden.double(), weight.double(), target, reduction)


def assert_close_all(got, want, rtol, atol):
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("T,H,V,chunk_size", [(1, 8, 11, None), (37, 19, 101, 8), (130, 24, 389, 64), (64, 16, 50, 64)])
def test_torch_path_float64_exact(reduction, T, H, V, chunk_size):
    hidden, weight, target = make_inputs(T, H, V, torch.float64)
    if T == 1:
        target[0] = 3  # a lone ignored row would make the mean 0/0
    fused = lambda h, w, t, reduction: fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk_size)
    got = loss_and_grads(fused, hidden, weight, target, reduction)
    assert_close_all(got, reference_in_float64(hidden, weight, target, reduction), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_path_fp32_tight(reduction):
    hidden, weight, target = make_inputs(75, 33, 257, torch.float32, seed=2)
    fused = lambda h, w, t, reduction: fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=16)
    got = loss_and_grads(fused, hidden, weight, target, reduction)
    assert_close_all(got, reference_in_float64(hidden, weight, target, reduction), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_path_bf16_loose(reduction):
    hidden, weight, target = make_inputs(70, 48, 300, torch.bfloat16, seed=3)
    fused = lambda h, w, t, reduction: fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=32)
    got = loss_and_grads(fused, hidden, weight, target, reduction)
    want = reference_in_float64(hidden, weight, target, reduction)
    # bf16 logits (8 mantissa bits) and bf16 gradient products: compare relative to each tensor's scale
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 3e-2 * b.abs().max().item() + 1e-3
    assert got[0].dtype == torch.float64 and fused(hidden, weight, target, reduction).dtype == torch.float32


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_triton_row_kernel_writes_every_element(logits_dtype):
    """Losses and scaled softmax-minus-one-hot rows into NaN-poisoned buffers; V odd, several vocabulary
    blocks with a masked tail, ignored rows, a different scale per row."""
    C, V = 7, 97
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(C, V, generator=g, dtype=torch.float64) * 4).to(logits_dtype)
    target = torch.randint(0, V, (C,), generator=g)
    target[[1, 5]] = IGNORE_INDEX
    scale = torch.rand(C, generator=g) + 0.5
    loss_out = torch.full((C,), float("nan"), device=KERNEL_DEVICE)
    grad_out = torch.full((C, V), float("nan"), dtype=logits_dtype, device=KERNEL_DEVICE)
    cross_entropy_grad_triton(logits.to(KERNEL_DEVICE), target.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE), loss_out,
                              grad_out, block_v=32)
    loss_out, grad_out = loss_out.cpu(), grad_out.cpu()

    x = logits.double().requires_grad_()
    want_losses = F.cross_entropy(x, target, ignore_index=IGNORE_INDEX, reduction="none")
    (want_grad,) = torch.autograd.grad((want_losses * scale.double()).sum(), x)
    tol = dict(rtol=1e-5, atol=1e-6) if logits_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss_out.double(), want_losses.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_out.double(), want_grad, **tol)
    assert not grad_out[[1, 5]].any()


def test_triton_row_kernel_in_place():
    """The hot path writes the gradient over the logits it reads."""
    C, V = 5, 61
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(C, V, generator=g) * 3
    target = torch.randint(0, V, (C,), generator=g)
    x = logits.double().requires_grad_()
    (want_grad,) = torch.autograd.grad(F.cross_entropy(x, target, reduction="sum"), x)
    logits = logits.to(KERNEL_DEVICE)
    losses = torch.full((C,), float("nan"), device=KERNEL_DEVICE)
    cross_entropy_grad_triton(logits, target.to(KERNEL_DEVICE), torch.ones(C, device=KERNEL_DEVICE), losses, logits,
                              block_v=16)
    torch.testing.assert_close(logits.cpu().double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_path_end_to_end(reduction):
    hidden, weight, target = make_inputs(19, 16, 97, torch.float32, seed=6, ignored_every=4)
    fused = lambda h, w, t, reduction: fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=8, use_triton=True)
    got = loss_and_grads(fused, hidden, weight, target, reduction, device=KERNEL_DEVICE)
    assert_close_all(got, reference_in_float64(hidden, weight, target, reduction), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_logits_size_is_kept_for_backward(reduction):
    T, H, V = 96, 16, 512
    hidden, weight, target = make_inputs(T, H, V, torch.float32, seed=7)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=32)
    assert saved and max(saved) <= max(T * H, V * H) < T * V
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy_reference(hidden, weight, target, reduction=reduction)
    assert max(saved) >= T * V  # the plain computation does keep one: the check above can see it


def test_no_grad_gives_the_same_losses_and_tied_weight_gradients_add_up():
    hidden, weight, target = make_inputs(40, 12, 70, torch.float64, seed=8)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=16)
    torch.testing.assert_close(no_grad, linear_cross_entropy_reference(hidden, weight, target, reduction="none").detach())
    # a tied LM head: the same weight also feeds the input, so autograd must add both contributions
    ids = torch.randint(0, 70, (40,), generator=torch.Generator().manual_seed(9))

    def tied_weight_grad(fn):
        w = weight.detach().clone().requires_grad_()
        fn(F.embedding(ids, w) + hidden.detach(), w, target).backward()
        return w.grad

    torch.testing.assert_close(tied_weight_grad(fused_linear_cross_entropy), tied_weight_grad(linear_cross_entropy_reference),
                               rtol=1e-10, atol=1e-12)


def test_rejects_out_of_range_targets():
    hidden, weight, target = make_inputs(6, 8, 10, torch.float32)
    target[2] = 10
    with pytest.raises(ValueError, match="target ids"):
        fused_linear_cross_entropy(hidden, weight, target)
