"""Teacher-forced scoring: log_softmax(hidden @ weight.T)[t, targets[t]] and whether the target is the
argmax, without ever holding the [tokens, vocab] logits of the whole batch.

- `fused_linear_logprob`: the Triton kernel (CUDA). A program owns a tile of tokens and a contiguous
  range of vocabulary tiles; per vocabulary tile it computes the logits with tl.dot (fp32 accumulation)
  and folds them into a running log-sum-exp, max / argmax and target logit. It writes those four values
  per (vocabulary range, token), and a few torch ops merge the ranges. Splitting the vocabulary keeps
  the GPU busy when there are few token tiles.
- `tiled_linear_logprob_cpu` (cpu_logprob.py): the CPU path, oneDNN products a vocabulary tile at a time
  folded into a running log-sum-exp in C.
- `chunked_linear_logprob`: the torch path (CPU without the C kernels, float64), chunked over tokens so
  that one chunk's fp32 logits stay within a byte budget.
- `linear_logprob`: the dispatch, what the engine's scoring calls.
- `linear_logprob_reference`: the plain computation (full logits, log_softmax, gather) in float64.

Ignored positions (target == ignore_index) give logprob 0.0 and is_argmax True: neutral for sums and
for all(). Argmax ties go to the lowest vocabulary id, as torch.argmax.
"""
import os

import torch
import triton
import triton.language as tl

from promptcot_engine.errors import InputError
from promptcot_engine.kernels.cpu_linear import cpu_linear
from promptcot_engine.kernels.cpu_logprob import cpu_logprob_applies, tiled_linear_logprob_cpu

IGNORE_INDEX = -100
LOGITS_BUDGET_BYTES = 64 * 2**20  # fp32 logits per chunk of the torch path


def linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs float64 [T], is_argmax bool [T]) from the full float64 logits."""
    logits = hidden.double() @ weight.double().T
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, 0, targets)
    logprobs = logits.log_softmax(-1).gather(1, safe_targets[:, None])[:, 0]
    return torch.where(ignored, 0.0, logprobs), (logits.argmax(-1) == targets) | ignored


@triton.jit
def _linear_logprob_partials_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    split_lse_ptr, split_max_ptr, split_argmax_ptr, split_target_logit_ptr,
    T, V, H, hidden_stride, weight_stride, tiles_per_split,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (token tile, split): over the split's vocabulary range, per token, the log-sum-exp, the
    max logit and its lowest id, and the target's logit (0 where the target lies outside the range)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_stride

    # a large finite negative, not -inf, so exp(m_old - m_new) never becomes NaN
    running_max = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    running_argmax = tl.zeros([BLOCK_T], dtype=tl.int32)
    target_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        weight_rows = weight_ptr + cols.to(tl.int64)[:, None] * weight_stride
        logits = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for h_start in range(0, H, BLOCK_H):
            hs = h_start + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            x = tl.load(hidden_rows + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            w = tl.load(weight_rows + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(x, tl.trans(w.to(x.dtype)), logits, input_precision=DOT_PRECISION)
        logits = tl.where(col_mask[None, :], logits, -1.0e30)

        tile_max, tile_argmax = tl.max(logits, 1, return_indices=True, return_indices_tie_break_left=True)
        # strictly greater: on a tie the earlier tile, holding the lower ids, keeps the argmax
        running_argmax = tl.where(tile_max > running_max, v_start + tile_argmax, running_argmax)
        new_max = tl.maximum(running_max, tile_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), 1)

    out = split * T + rows
    tl.store(split_lse_ptr + out, running_max + tl.log(running_sum), mask=row_mask)
    tl.store(split_max_ptr + out, running_max, mask=row_mask)
    tl.store(split_argmax_ptr + out, running_argmax, mask=row_mask)
    tl.store(split_target_logit_ptr + out, target_logit, mask=row_mask)


def default_num_splits(num_tokens: int, vocab_size: int, block_t: int, block_v: int, device: torch.device) -> int:
    """Enough vocabulary splits for about two programs per streaming multiprocessor."""
    token_tiles = triton.cdiv(num_tokens, block_t)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(vocab_size, block_v), triton.cdiv(2 * sm_count, token_tiles)))


def vocab_tiles_per_split(vocab_size: int, block_v: int, num_splits: int) -> int:
    return triton.cdiv(triton.cdiv(vocab_size, block_v), num_splits)


def linear_logprob_partials_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   split_lse: torch.Tensor, split_max: torch.Tensor, split_argmax: torch.Tensor,
                                   split_target_logit: torch.Tensor, *, block_t: int = 64, block_v: int = 128,
                                   block_h: int = 64, num_warps: int = 8, num_stages: int = 3) -> None:
    """Run the kernel into [num_splits, T] buffers (fp32, fp32, int32, fp32); split s covers the vocabulary
    tiles s * tiles_per_split onwards. hidden and weight need a unit stride on H."""
    T, H = hidden.shape
    V = weight.shape[0]
    num_splits = split_lse.shape[0]
    tiles_per_split = vocab_tiles_per_split(V, block_v, num_splits)
    _linear_logprob_partials_kernel[(triton.cdiv(T, block_t), num_splits)](
        hidden, weight, targets, split_lse, split_max, split_argmax, split_target_logit,
        T, V, H, hidden.stride(0), weight.stride(0), tiles_per_split,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h,
        # the interpreter computes bf16 products wrongly; on GPU bf16/fp16 stay on the tensor cores, and
        # fp32 uses three tf32 products for about fp32 accuracy
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        DOT_PRECISION="tf32x3" if hidden.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )


def merge_partials(split_lse: torch.Tensor, split_max: torch.Tensor, split_argmax: torch.Tensor,
                   split_target_logit: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the per-range values into (logprobs fp32 [T], is_argmax bool [T])."""
    ignored = targets == ignore_index
    # the target lies in exactly one range; the others contribute an exact 0
    logprobs = split_target_logit.sum(0) - torch.logsumexp(split_lse, 0)
    # torch.argmax returns the first maximal range, which holds the lowest ids: ties still go low
    best_range = split_max.argmax(0, keepdim=True)
    argmax = split_argmax.gather(0, best_range)[0]
    return torch.where(ignored, 0.0, logprobs), (argmax == targets) | ignored


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, *, num_splits: int | None = None, block_t: int = 64,
                         block_v: int = 128, block_h: int = 64, num_warps: int = 8,
                         num_stages: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `linear_logprob` (block sizes for the GPU by default; tests pass small ones)."""
    _check_inputs(hidden, weight, targets, ignore_index)
    T, V = hidden.shape[0], weight.shape[0]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(T, V, block_t, block_v, hidden.device)
    # drop the ranges left empty when the vocabulary tiles do not share out evenly: they would only add
    # programs that write a neutral result
    num_splits = triton.cdiv(triton.cdiv(V, block_v), vocab_tiles_per_split(V, block_v, num_splits))
    partials = [torch.empty(num_splits, T, dtype=dtype, device=hidden.device)
                for dtype in (torch.float32, torch.float32, torch.int32, torch.float32)]
    linear_logprob_partials_triton(hidden, weight, targets.contiguous(), *partials, block_t=block_t, block_v=block_v,
                                   block_h=block_h, num_warps=num_warps, num_stages=num_stages)
    return merge_partials(*partials, targets, ignore_index)


def chunked_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX,
                           chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of `linear_logprob`: at most chunk_tokens rows of logits at a time (by default as
    many as fit LOGITS_BUDGET_BYTES in fp32), multiplied by `cpu_linear` (oneDNN on CPU). bf16/fp16 inputs
    are multiplied in fp32, which takes one fp32 copy of the weight for the call: a bf16 product would
    round every logit to 8 bits."""
    _check_inputs(hidden, weight, targets, ignore_index)
    T, V = hidden.shape[0], weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_BUDGET_BYTES // (4 * V))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weight = weight.to(dtype)
    logprobs = torch.empty(T, dtype=torch.float32, device=hidden.device)
    is_argmax = torch.empty(T, dtype=torch.bool, device=hidden.device)
    for start in range(0, T, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        chunk_targets = targets[rows]
        # the log-sum-exp is computed in place in the logits: no second chunk-sized temporary
        logits = cpu_linear(hidden[rows].to(dtype), weight)
        ignored = chunk_targets == ignore_index
        target_logit = logits.gather(1, torch.where(ignored, 0, chunk_targets)[:, None])[:, 0]
        max_logit, argmax = logits.max(1)  # the first maximal id on ties, as torch.argmax
        log_sum_exp = max_logit + logits.sub_(max_logit[:, None]).exp_().sum(1).log()
        logprobs[rows] = torch.where(ignored, 0.0, target_logit - log_sum_exp)
        is_argmax[rows] = (argmax == chunk_targets) | ignored
        del logits  # before the next chunk's product: one chunk of logits alive at a time
    return logprobs, is_argmax


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs fp32 [T], is_argmax bool [T]) for hidden [T, H], weight [V, H] (the LM head), targets [T]
    int64: logprobs[t] = log_softmax(hidden[t] @ weight.T)[targets[t]] with fp32 accumulation, is_argmax[t]
    = (argmax of those logits == targets[t]). Triton on CUDA, vocabulary tiles with the C log-sum-exp on CPU
    where they apply, chunked torch elsewhere."""
    if hidden.is_cuda:
        return fused_linear_logprob(hidden, weight, targets, ignore_index)
    if cpu_logprob_applies(hidden, weight):
        _check_inputs(hidden, weight, targets, ignore_index)
        return tiled_linear_logprob_cpu(hidden, weight, targets, ignore_index)
    return chunked_linear_logprob(hidden, weight, targets, ignore_index)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    V = weight.shape[0]
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise InputError(f"target token id {int(targets[index])} at index {index} is outside the vocabulary "
                         f"[0, {V}) (and is not ignore_index {ignore_index})")
