"""Paged prefill attention in Triton: several sequences' new tokens attend causally over their whole context,
read from the paged KV cache through the block tables (prefix-cache hits, later chunks of a chunked prefill,
recompute after preemption), for the engine's `triton` attention backend.

It exists because the torch path, `paged_prefill_attention_torch` (paged_attention.py, the contract matched
here and the reference the tests hold it to), pads the queries to the longest sequence, gathers every
sequence's whole context out of the blocks and builds a [B, 1, max_q, context] mask: memory in
O(B * heads * max_q * context), tens of GB on long contexts. This kernel reads keys and values in place, tile by
tile, with an online softmax: nothing is padded, gathered or materialised beyond one tile per program.

Layout: see paged_attention.py. Numerics as in the decode kernel there: scores and softmax in fp32, bf16/fp16
operands on the tensor cores as they are, fp32 ones through tf32x3; the interpreter upcasts after loading.
"""
import os

import torch
import triton
import triton.language as tl

from promptcot_engine.kernels.paged_attention import check_grouped_heads, check_unit_head_strides, load_kv_tile

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the scale and log2(e) fold into one multiply


@triton.jit
def _paged_prefill_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, qk_scale,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h,
    cache_stride_block, cache_stride_slot, cache_stride_head, block_tables_stride,
    block_size, queries_per_kv, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, sequence, kv head). Its BLOCK_M rows are (new token, query head) pairs of
    that sequence and kv head, row r = token r // queries_per_kv, head r % queries_per_kv (the decode kernel's
    folding of the group, extended over tokens): each key and value tile is loaded once for all the query heads
    that share it, and a small group (SmolLM2's 3, or 1 without GQA) still fills the rows of the products.

    qk_scale: softmax scale * log2(e), so the softmax runs on exp2."""
    seq = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    num_rows = q_len * queries_per_kv
    # a (sequence, kv head)'s tiles run last first: later tiles see more keys (causal), so its longest programs
    # start earliest and the short ones fill in behind them instead of leaving a tail of long ones at the end
    row_start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    # the grid covers the longest sequence; the tiles past this sequence's new tokens (all of them for a
    # sequence with q_len 0) have nothing to do
    if row_start >= num_rows:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len  # new token i sits at position prefix_len + i

    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tokens = rows // queries_per_kv
    heads = kv_head * queries_per_kv + rows % queries_per_kv
    q_positions = prefix_len + tokens
    # int64: token * stride exceeds 2^31 once T * num_heads * head_dim does (e.g. 256k tokens of 64 x 128)
    token_ids = (q_start + tokens).to(tl.int64)
    q_mask = (rows < num_rows)[:, None] & (dims < head_dim)[None, :]
    q = tl.load(q_ptr + token_ids[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # causal: no key past the position of the tile's last new token is visible to any of its rows
    last_token = (tl.minimum(row_start + BLOCK_M, num_rows) - 1) // queries_per_kv
    kv_end = prefix_len + last_token + 1

    # online softmax in fp32 (base 2); a large finite negative, not -inf, so exp2(m_old - m_new) never is NaN
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, block_tables_stride, positions,
                            positions < kv_end, block_size, cache_stride_block, cache_stride_slot,
                            cache_stride_head, kv_head, dims, head_dim, UPCAST)
        # per element: row r sees the keys up to its own position (which also keeps it inside the context).
        # One loop with the mask on every tile rather than a mask-free loop plus a diagonal one: the select is
        # cheap next to the two products, and one loop is one place for the causal rule to be right
        visible = positions[None, :] <= q_positions[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(visible, scores, -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, 1))
        # zero, not exp2(0), where nothing is visible: a row that has seen no key yet (only possible for a
        # malformed context_len < q_len) must stay empty rather than average the masked keys
        p = tl.where(visible, tl.exp2(scores - m_new[:, None]), 0.0)
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # l >= 1 for every row with a visible key (its maximum contributes exp2(0)), and every well-formed row sees
    # at least key 0; a row that saw nothing keeps acc 0 and gets a zero output, as in the decode kernel
    out = acc / tl.maximum(l, 1.0)[:, None]
    tl.store(out_ptr + token_ids[:, None] * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def default_tiles(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) the wrapper launches with. tl.dot needs every dimension >= 16: a short
    head_dim is padded with masked dimensions. Shared memory a block may use: 227 KiB on sm_90, 163 KiB on sm_80
    (tests/kernels/gpu_launch.py compiles the launches for both). bf16 with 64 x 64 tiles takes 80 KiB at head_dim
    128 on sm_90, 160 KiB at 256; fp32 (tf32x3 keeps extra split operands) takes 192 KiB at 64 x 64 x 128, hence
    BLOCK_N 32 for fp32 (128 KiB at 128), and past head_dim 128 tiles of 32 x 16 (64 x 16 takes 168-192 KiB)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype != torch.float32:
        return 64, 64, block_d
    return (64, 32, block_d) if block_d <= 128 else (32, 16, block_d)


def paged_prefill_attention_triton(q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                   scale: float, max_seqlen_q: int, out: torch.Tensor | None = None, *,
                                   block_m: int | None = None, block_n: int | None = None,
                                   num_warps: int = 4) -> torch.Tensor:
    """The contract of `paged_prefill_attention_torch`: q [T, num_heads, head_dim] holds sequence b's new tokens
    in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] (int32 [B + 1]); they are the last q_len[b] of its
    context_lens[b] (int32 [B]) tokens, already stored in k_cache/v_cache [num_blocks, block_size, num_kv_heads,
    head_dim] through block_tables (int32 [B, max_blocks]); new token i attends to positions 0..context_lens[b] -
    q_len[b] + i. Returns [T, num_heads, head_dim] in q's dtype (into `out` when given), softmax in fp32.

    max_seqlen_q: the most new tokens of any sequence (the engine has it on the host; reading it from
    cu_seqlens_q would stall on the device). A smaller value leaves the rows past it unwritten. Like the decode
    kernel it trusts the tables and lengths (no check of device values: that would synchronise every layer).
    block_m, block_n: the query and key tiles (default: `default_tiles`)."""
    check_grouped_heads(q, k_cache, "T")
    T, num_heads, head_dim = q.shape
    B = context_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    if v_cache.shape != k_cache.shape or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache and v_cache must match in shape and have q's dtype {q.dtype}; got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if (cu_seqlens_q.shape != (B + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != B
            or context_lens.dim() != 1):
        raise ValueError(f"expected cu_seqlens_q [B + 1], block_tables [B, max_blocks], context_lens [B]; got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    if any(t.dtype != torch.int32 for t in (cu_seqlens_q, block_tables, context_lens)):
        raise ValueError("cu_seqlens_q, block_tables and context_lens must be int32 (the kernel reads them so)")
    if cu_seqlens_q.stride(0) != 1 or context_lens.stride(0) != 1 or block_tables.stride(1) != 1:
        raise ValueError("cu_seqlens_q, context_lens and the rows of block_tables must be contiguous")
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)}")
    check_unit_head_strides(q, out, k_cache, v_cache)
    if T == 0 or max_seqlen_q == 0 or B == 0:
        return out
    # grid: (query tiles of the longest sequence, sequences, kv heads), tiles past a sequence's own new tokens
    # returning at once, rather than a host-built table of (sequence, tile) pairs: the table would need the
    # per-sequence lengths on the host (or a device-side cumsum and a synchronising read of its size) and a
    # tensor upload every step, while an empty program costs a couple of loads. Its price is idle programs when
    # one sequence has many more new tokens than the others; they exit before touching the cache.
    default_m, default_n, block_d = default_tiles(q.dtype, head_dim)
    block_m, block_n = block_m or default_m, block_n or default_n
    if any(tile < 16 or tile & (tile - 1) for tile in (block_m, block_n)):
        raise ValueError(f"block_m and block_n must be powers of two >= 16 (tl.dot), got {block_m} and {block_n}")
    grid = (triton.cdiv(max_seqlen_q * queries_per_kv, block_m), B, num_kv_heads)
    _paged_prefill_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], queries_per_kv, head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # the interpreter computes bf16 products wrongly; on GPU bf16/fp16 stay on the tensor cores
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
