"""Fused linear cross-entropy: the loss of softmax(hidden @ weight.T) against target ids, without a
[tokens, vocab] logits tensor ever living beyond one chunk of tokens.

The tokens are cut into chunks. For each chunk the logits are computed, turned into per-token losses and,
in the same pass, into d(loss)/d(logits) (written over the logits buffer), which is immediately multiplied
back into d(hidden) for the chunk and accumulated (fp32) into d(weight). Only those two gradients, the size
of the inputs, are kept for backward, which merely scales them by the incoming gradient. That works for
"mean" and "sum", where the incoming gradient is one scalar; with reduction "none" each token's gradient
has its own scale (the DPO loss weighs every sequence differently), so the forward keeps the inputs and
the backward recomputes the chunks, still one chunk at a time.

The per-row step (log-sum-exp, loss, softmax minus one-hot) is a Triton kernel on GPU and plain torch
elsewhere; the matrix products are cuBLAS / BLAS in both. `linear_cross_entropy_reference` is the plain
F.linear + F.cross_entropy computation the fused one must equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """What the fused version computes, the plain way: full logits, upcast, then cross-entropy."""
    logits = F.linear(hidden, weight).float() if hidden.dtype != torch.float64 else F.linear(hidden, weight)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, logits_stride, grad_ptr, grad_stride, target_ptr, loss_ptr, grad_scale_ptr,
    V, ignore_index, BLOCK_V: tl.constexpr,
):
    """One program per row: loss = logsumexp(x) - x[target] and grad = (softmax(x) - onehot) * scale.
    grad may alias logits: each element is read before it is overwritten."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    grad_row = grad_ptr + row * grad_stride
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=cols < V)
        tl.store(loss_ptr + row, 0.0)
        return

    # pass 1: running max and rescaled sum of exponentials, in fp32 whatever the logits' dtype. Masked
    # columns get a large finite negative, not -inf, which would make exp(running_max - new_max) NaN.
    running_max = -1.0e30
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.where(mask, tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32), -1.0e30)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(logits_row + target).to(tl.float32)  # read before pass 2 may overwrite it
    tl.store(loss_ptr + row, lse - target_logit)

    # pass 2: the gradient of scale * loss with respect to the logits
    scale = tl.load(grad_scale_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse)
        grad = tl.where(cols == target, grad - 1.0, grad) * scale
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_triton(logits: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor,
                              loss_out: torch.Tensor, grad_out: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                              block_v: int | None = None) -> None:
    """Write per-row losses (fp32) into loss_out and d(sum(grad_scale * loss))/d(logits) into grad_out
    (which may be `logits` itself). logits [C, V] with unit column stride, target [C], grad_scale [C] fp32."""
    C, V = logits.shape
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 4096)
    _cross_entropy_grad_kernel[(C,)](
        logits, logits.stride(0), grad_out, grad_out.stride(0), target, loss_out, grad_scale,
        V, ignore_index, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )


def cross_entropy_grad_torch(logits: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor | None,
                             ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same step in torch: (per-row losses, gradient in the logits' dtype, or None without a
    grad_scale). Works in place on fp32 logits (which the caller owns), so no second [C, V] buffer is made."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=1)
    losses = (lse - x.gather(1, safe_target).squeeze(1)) * valid
    if grad_scale is None:
        return losses, None
    grad = x.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, safe_target, torch.full_like(safe_target, -1, dtype=grad.dtype))
    grad.mul_((grad_scale * valid).unsqueeze(1).to(grad.dtype))
    return losses, grad.to(logits.dtype)


def _cross_entropy_grad(logits, target, grad_scale, ignore_index, use_triton):
    if use_triton:
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        if grad_scale is None:  # the kernel always writes a gradient; a zero scale makes it a cheap one
            grad_scale = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        cross_entropy_grad_triton(logits, target, grad_scale.float().contiguous(), losses, logits, ignore_index)
        return losses, logits
    return cross_entropy_grad_torch(logits, target, grad_scale, ignore_index)


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits take about as much memory as the hidden states (at
    least 256 rows, which keeps the matrix products efficient)."""
    chunks = max(1, -(-vocab_size // hidden_size))
    return max(256, triton.next_power_of_2(-(-num_tokens // chunks)))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    # under bf16 autocast the backward's recomputed logits must come out as the forward's did
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, target, ignore_index, reduction, chunk_size, compute_grads, use_triton):
        T = hidden.shape[0]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        compute_weight = weight.to(hidden.dtype)
        valid = target != ignore_index
        num_valid = valid.sum()
        precompute = compute_grads and reduction != "none"
        if precompute:
            scale = 1.0 / num_valid.to(acc_dtype) if reduction == "mean" else torch.ones((), dtype=acc_dtype, device=hidden.device)
            grad_scale = scale.expand(T)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        losses = torch.empty(T, dtype=acc_dtype, device=hidden.device)
        for start in range(0, T, chunk_size):
            rows = slice(start, min(start + chunk_size, T))
            logits = hidden[rows] @ compute_weight.T
            losses[rows], grad_logits = _cross_entropy_grad(logits, target[rows], grad_scale[rows] if precompute else None,
                                                            ignore_index, use_triton)
            if precompute:
                grad_hidden[rows] = grad_logits @ compute_weight
                grad_weight += (grad_logits.T @ hidden[rows]).to(acc_dtype)
            del logits, grad_logits

        ctx.reduction, ctx.chunk_size, ctx.ignore_index, ctx.use_triton = reduction, chunk_size, ignore_index, use_triton
        ctx.weight_dtype = weight.dtype
        if precompute:
            ctx.save_for_backward(grad_hidden, grad_weight)
        elif compute_grads:
            ctx.save_for_backward(hidden, weight, target)
        ctx.mark_non_differentiable(target)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / num_valid if reduction == "mean" else total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output):
        if ctx.reduction != "none":
            grad_hidden, grad_weight = ctx.saved_tensors
            return (grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype),
                    None, None, None, None, None, None)
        hidden, weight, target = ctx.saved_tensors
        compute_weight = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, hidden.shape[0]))
            logits = hidden[rows] @ compute_weight.T
            _, grad_logits = _cross_entropy_grad(logits, target[rows], grad_output[rows], ctx.ignore_index, ctx.use_triton)
            grad_hidden[rows] = grad_logits @ compute_weight
            grad_weight += (grad_logits.T @ hidden[rows]).to(grad_weight.dtype)
            del logits, grad_logits
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               chunk_size: int | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, target) for hidden [T, H], weight [V, H], target [T].

    reduction "mean" averages over the non-ignored targets, "sum" adds them, "none" returns the [T]
    per-token losses (0 at ignored targets), all in fp32 (float64 for float64 inputs), as F.cross_entropy
    on upcast logits would. use_triton defaults to "on CUDA".
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or target.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H], weight [V, H], target [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(target.shape)}")
    V = weight.shape[0]
    if bool((((target < 0) | (target >= V)) & (target != ignore_index)).any()):
        raise ValueError(f"target ids must lie in [0, {V}) or equal ignore_index ({ignore_index})")
    if use_triton is None:
        use_triton = hidden.is_cuda
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], V)
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight, target.contiguous(), ignore_index, reduction,
                                          chunk_size, compute_grads, use_triton)
