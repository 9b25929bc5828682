"""Attention that reads keys and values from the paged KV cache through block tables.

Layout (shared with kv_cache_store and flash-attn): k_cache, v_cache [num_blocks, block_size, num_kv_heads,
head_dim]; block_tables int32 [B, max_blocks_per_seq], where entries past a sequence's last block are
padding (any value, never read); context_lens int32 [B]: the tokens in the cache for each sequence,
including those of the current step. Query head h reads kv head h // (num_heads // num_kv_heads), as
transformers' repeat_kv does.

- decode (one new token per sequence): `paged_decode_attention` runs the Triton kernel on CUDA (or where
  asked to) and `paged_decode_attention_torch`, its batched reference, elsewhere;
- prefill of new tokens after a cached prefix (prefix-cache hits, chunked prefill, recompute after
  preemption): `paged_prefill_attention_torch`, the reference of the Triton kernel in
  paged_prefill_attention.py (flash-attn's varlen kernel does it on GPU when installed).

A sequence with context_len 0 (a padding row of a captured CUDA graph) gets a zero output, not NaN.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, block_tables_stride, positions, in_range,
                 block_size, cache_stride_block, cache_stride_slot, cache_stride_head, kv_head, dims, head_dim,
                 UPCAST: tl.constexpr):
    """The keys and values [len(positions), BLOCK_D] of one kv head at the given positions of sequence `seq`,
    zeros where `in_range` is false or past head_dim. Tiles need not align with cache blocks: each position
    finds its own block, so any block_size works; the mask keeps the block tables' padding entries and the
    slots past the context unread. Shared by the decode and prefill kernels (paged_prefill_attention.py)."""
    block_ids = tl.load(block_tables_ptr + seq * block_tables_stride + positions // block_size, mask=in_range, other=0)
    slots = (block_ids.to(tl.int64) * cache_stride_block + (positions % block_size) * cache_stride_slot
             + kv_head * cache_stride_head)
    kv_mask = in_range[:, None] & (dims < head_dim)[None, :]
    k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _paged_decode_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, scale,
    q_stride_b, q_stride_h, out_stride_b, out_stride_h,
    cache_stride_block, cache_stride_slot, cache_stride_head, block_tables_stride,
    block_size, queries_per_kv, head_dim,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (sequence, kv head): the query heads sharing that kv head form the rows of one
    matrix product per tile of BLOCK_N cached tokens, so each key and value is loaded once for all of them."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * queries_per_kv + group
    q_mask = (group < queries_per_kv)[:, None] & (dims < head_dim)[None, :]
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # online softmax in fp32; a large finite negative, not -inf, so exp(m_old - m_new) never becomes NaN
    m = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, context_len, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        in_context = positions < context_len
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, block_tables_stride, positions,
                            in_context, block_size, cache_stride_block, cache_stride_slot, cache_stride_head,
                            kv_head, dims, head_dim, UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(in_context[None, :], scores, -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # l >= 1 whenever the context is not empty (its maximum contributes exp(0)); an empty one leaves acc 0
    out = acc / tl.maximum(l, 1.0)[:, None]
    tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def check_grouped_heads(q: torch.Tensor, k_cache: torch.Tensor, rows: str) -> None:
    """q [rows, num_heads, head_dim] against caches [blocks, block_size, num_kv_heads, head_dim], the query heads
    in whole groups per kv head: what the decode and prefill paths all take."""
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"expected q [{rows}, nh, d] and caches [blocks, block_size, nkv, d] with nh a multiple of "
                         f"nkv; got {tuple(q.shape)} and {tuple(k_cache.shape)}")


def check_unit_head_strides(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The Triton kernels address head_dim as contiguous and both caches through one set of strides."""
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q, out and the caches need a unit stride on head_dim, and the caches equal strides")


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  out: torch.Tensor | None = None, *, block_n: int | None = None,
                                  num_warps: int = 4) -> torch.Tensor:
    B, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    check_unit_head_strides(q, out, k_cache, v_cache)
    if block_n is None:
        # fp32 tiles of 64 keys past head_dim 128 need 168 KiB of shared memory: more than an A100 block has
        block_n = 32 if q.dtype == torch.float32 and head_dim > 128 else 64
    _paged_decode_attention_kernel[(B, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], queries_per_kv, head_dim,
        # tl.dot needs at least 16 rows: small groups are padded with masked heads
        BLOCK_G=max(16, triton.next_power_of_2(queries_per_kv)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # the interpreter computes bf16 products wrongly; on GPU bf16/fp16 stay on the tensor cores
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out


@dataclass
class PagedGather:
    """How to gather a batch's paged KV into SDPA's layout: built once per step from the block tables and
    reused by every layer."""
    blocks: torch.Tensor  # [B * width] block ids to read (padding entries of the tables replaced by block 0)
    past_context: torch.Tensor  # flat token positions past each context, zeroed after the gather
    in_context: torch.Tensor  # [B, width * block_size] bool
    batch: int
    width: int

    @classmethod
    def plan(cls, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> "PagedGather":
        B, width = block_tables.shape
        device = block_tables.device
        used_blocks = (context_lens.long() + block_size - 1) // block_size
        # padding entries of the block tables may hold any value: never use them as indices
        blocks = torch.where(torch.arange(width, device=device)[None, :] < used_blocks[:, None], block_tables.long(), 0)
        in_context = torch.arange(width * block_size, device=device)[None, :] < context_lens[:, None]
        return cls(blocks.flatten(), (~in_context).flatten().nonzero().squeeze(1), in_context, B, width)

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """cache [num_blocks, block_size, num_kv_heads, head_dim] -> [B, num_kv_heads, width * block_size,
        head_dim] (a strided view of one copy), zero past each context.

        Whole blocks are gathered with one index_select (contiguous runs of block_size * heads * head_dim
        values), and the positions past the context are then zeroed in place (a write of the tails only):
        stale or never-written memory may be NaN, which a zero attention weight would not cancel (0 * NaN = NaN)."""
        _, block_size, num_kv_heads, head_dim = cache.shape
        runs = cache.index_select(0, self.blocks)
        runs.view(self.batch * self.width * block_size, -1).index_fill_(0, self.past_context, 0)
        return runs.view(self.batch, self.width * block_size, num_kv_heads, head_dim).transpose(1, 2)


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 gather: PagedGather | None = None) -> torch.Tensor:
    """gather: PagedGather.plan(block_tables, context_lens, block_size), when the caller reuses it across layers."""
    B, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if gather is None:
        gather = PagedGather.plan(block_tables, context_lens, k_cache.shape[1])
    k, v, in_context = gather.gather(k_cache), gather.gather(v_cache), gather.in_context
    # the query heads sharing a kv head act as that head's query rows: one SDPA call, no repeat_kv copy
    grouped_q = q.reshape(B, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=in_context[:, None, None, :], scale=scale)
    out = out.reshape(B, num_heads, head_dim)
    # an empty context has an all-masked softmax row (NaN): give it zeros, as the kernel does
    return torch.where((context_lens > 0)[:, None, None], out, 0.0)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, force_triton: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query token per sequence over its whole cached context.
    q [B, num_heads, head_dim] -> [B, num_heads, head_dim] in q's dtype; softmax in fp32. force_triton: the
    Triton kernel whatever the device (on CPU tensors, Triton's interpreter runs it)."""
    check_grouped_heads(q, k_cache, "B")
    if q.is_cuda or force_triton:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


@dataclass
class PagedPrefill:
    """Everything paged prefill attention needs besides q and the caches, built once per step from the batch's
    layout and reused by every layer: the padded place of each new token, the gather plan and the causal mask."""
    seq_of_token: torch.Tensor  # [T]
    index_in_seq: torch.Tensor  # [T]
    max_q: int
    gather: PagedGather
    visible: torch.Tensor  # [B, 1, max_q, width * block_size] bool

    @classmethod
    def plan(cls, cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
             block_size: int, max_q: int | None = None) -> "PagedPrefill":
        device = cu_seqlens_q.device
        q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        max_q = int(q_lens.max()) if max_q is None else max_q
        seq_of_token = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=device), q_lens)
        index_in_seq = torch.arange(seq_of_token.shape[0], device=device) - cu_seqlens_q[seq_of_token].long()
        gather = PagedGather.plan(block_tables, context_lens, block_size)
        # padding query rows get positions >= context_len, so they still see the whole context: no empty
        # softmax row (NaN) appears even though their outputs are dropped
        q_positions = (context_lens.long() - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
        k_positions = torch.arange(gather.in_context.shape[1], device=device)
        visible = (k_positions[None, None, :] <= q_positions[:, :, None]) & gather.in_context[:, None, :]
        return cls(seq_of_token, index_in_seq, max_q, gather, visible[:, None])


def paged_prefill_attention_torch(q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, plan: PagedPrefill | None = None) -> torch.Tensor:
    """Causal attention of several sequences' new tokens over their cached context, the new tokens'
    own keys and values already stored in it. q [T, num_heads, head_dim] holds the new tokens of sequence
    b in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]; they are the last tokens of its context_lens[b], so
    new token i sits at position context_lens[b] - q_len[b] + i and sees cache positions up to its own.
    Returns [T, num_heads, head_dim] in q's dtype. plan: PagedPrefill.plan(...) of the same arguments, when the
    caller reuses it across layers."""
    T, num_heads, head_dim = q.shape
    if plan is None:
        plan = PagedPrefill.plan(cu_seqlens_q, block_tables, context_lens, k_cache.shape[1])
    padded_q = q.new_zeros(context_lens.shape[0], plan.max_q, num_heads, head_dim)
    padded_q[plan.seq_of_token, plan.index_in_seq] = q
    k, v = plan.gather.gather(k_cache), plan.gather.gather(v_cache)
    out = F.scaled_dot_product_attention(padded_q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=plan.visible, scale=scale, enable_gqa=num_heads != k_cache.shape[2])
    return out.transpose(1, 2)[plan.seq_of_token, plan.index_in_seq]
