"""Paged prefill attention on the CPU in C (csrc/cpu/paged_prefill_attention.c), through kernels/cpu_library.py.

The contract of `paged_prefill_attention_torch` (paged_attention.py), its reference: several sequences' new
tokens attend causally over their whole context in the paged cache, their own keys and values already stored
there. It serves the engine's prefills on CPU, whether or not a cached prefix comes before the new tokens
(scoring after a shared context, the prompts' first chunk), without padding the sequences or gathering their
context out of the blocks.
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_library import DTYPE_CODES, library
from promptcot_engine.kernels.cpu_paged_attention import kernel_inputs, raise_for_status


def paged_prefill_attention_cpu(q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> [T, num_heads, head_dim] (into `out` when given: contiguous, q's shape and
    dtype); the paged_prefill_attention_torch contract. It trusts the block tables: every block a context
    reaches must be in the cache."""
    q, k_cache, v_cache, block_tables, context_lens, out = kernel_inputs("prefill", q, k_cache, v_cache, block_tables,
                                                                         context_lens, out)
    T, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    if int(cu_seqlens_q[-1]) != T:
        raise ValueError(f"cu_seqlens_q ends at {int(cu_seqlens_q[-1])}, q holds {T} tokens")
    status = library.pce_cpu_paged_prefill_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        cu_seqlens_q.data_ptr(), out.data_ptr(), context_lens.shape[0], num_heads, num_kv_heads, head_dim,
        block_size, block_tables.shape[1], scale, DTYPE_CODES[q.dtype])
    raise_for_status(status, "paged_prefill_attention_cpu", q, k_cache,
                     " (or a sequence with more new tokens than context)")
    return out
