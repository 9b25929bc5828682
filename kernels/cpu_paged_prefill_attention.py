"""Paged prefill attention on the CPU in C (csrc/cpu/paged_prefill_attention.c), through kernels/cpu_library.py.

The contract of `paged_prefill_attention_torch` (paged_attention.py), its reference: several sequences' new
tokens attend causally over their whole context in the paged cache, their own keys and values already stored
there. It serves the engine's prefills on CPU, whether or not a cached prefix comes before the new tokens
(scoring after a shared context, the prompts' first chunk), without padding the sequences or gathering their
context out of the blocks.
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_library import DTYPE_CODES, LIBRARY_PATH, library
from promptcot_engine.kernels.cpu_paged_attention import cpu_attention_kernels_apply


def paged_prefill_attention_cpu(q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> [T, num_heads, head_dim] (into `out` when given: contiguous, q's shape and
    dtype); the paged_prefill_attention_torch contract. It trusts the block tables: every block a context
    reaches must be in the cache."""
    if not cpu_attention_kernels_apply(q, k_cache):
        raise RuntimeError(f"the CPU prefill-attention kernel does not take q {q.dtype} {tuple(q.shape)} on {q.device} "
                           f"with a {k_cache.dtype} cache on {k_cache.device} (or is not built: {LIBRARY_PATH})")
    T, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # views of one layer: already contiguous
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    if int(cu_seqlens_q[-1]) != T:
        raise ValueError(f"cu_seqlens_q ends at {int(cu_seqlens_q[-1])}, q holds {T} tokens")
    status = library.pce_cpu_paged_prefill_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        cu_seqlens_q.data_ptr(), out.data_ptr(), context_lens.shape[0], num_heads, num_kv_heads, head_dim,
        block_size, block_tables.shape[1], scale, DTYPE_CODES[q.dtype])
    if status == -1:
        raise MemoryError("paged_prefill_attention_cpu: no memory for its work buffers")
    if status != 0:
        raise ValueError(f"paged_prefill_attention_cpu: shapes or lengths it does not take: q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}, a sequence with more new tokens than context")
    return out
