"""Attention over the paged KV cache: the AttentionFn the model runner hands to the model each step.

Every step first stores the new tokens' K/V at their slots, then attends:
- prefill on CPU with the C kernels built: the C kernel (kernels/cpu_paged_prefill_attention.py) reads each
  sequence's whole context from the cache, cached prefix or not, with no padding;
- prefill, no cached context, otherwise: plain causal attention over the new tokens (flash-attn varlen on
  CUDA, padded SDPA on CPU): nothing needs to be read back from the cache;
- prefill with a cached prefix (prefix cache hit, a later chunk, a recompute), otherwise: queries attend to
  the sequence's cached tokens through its block table (flash-attn varlen with block_table on CUDA;
  the Triton paged-prefill kernel, kernels/paged_prefill_attention.py, on the triton backend; a batched
  torch path otherwise);
- decode, one query per sequence: flash_attn_with_kvcache, the Triton paged-decode kernel, or on CPU the C
  kernel (kernels/cpu_paged_attention.py); where none applies, the batched torch path, which reads a prefix
  shared by several sequences (n > 1 samples) only once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptcot_engine.attention.shared_prefix import SharedPrefixPlan, shared_prefix_decode_attention
from promptcot_engine.attention.varlen import VarlenCausalAttention
from promptcot_engine.kernels.cpu_paged_attention import paged_decode_attention_cpu
from promptcot_engine.kernels.cpu_paged_prefill_attention import paged_prefill_attention_cpu
from promptcot_engine.kernels.kv_cache_store import store_kvcache
from promptcot_engine.kernels.paged_attention import (
    PagedGather,
    PagedPrefill,
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
)
from promptcot_engine.kernels.paged_prefill_attention import paged_prefill_attention_triton


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: cached tokens after this step's tokens are stored
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_context_len: int
    has_cached_context: bool  # some sequence attends to tokens computed in an earlier step
    cpu_kernels: bool = False  # attention on CPU through the C kernels (decode and prefill)
    shared_prefix: SharedPrefixPlan | None = None  # decode on the torch backend otherwise, when sequences share blocks
    paged_gather: PagedGather | None = None  # decode on the torch backend otherwise: built once for all layers
    paged_prefill: PagedPrefill | None = None  # prefill over cached context, torch backend without C: likewise


class PagedAttention:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], metadata: AttentionMetadata,
                 backend: str, scale: float):
        self.kv_caches = kv_caches
        self.metadata = metadata
        self.backend = backend  # "torch", "triton" or "flash" (resolved by the model runner)
        self.scale = scale
        self.fresh = None
        if metadata.is_prefill and not metadata.has_cached_context and not metadata.cpu_kernels:
            self.fresh = VarlenCausalAttention(metadata.cu_seqlens_q)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        md = self.metadata
        k_cache, v_cache = self.kv_caches[layer_idx]
        # the triton backend runs its kernels whatever the device: on CPU that is Triton's interpreter (tests)
        store_kvcache(k, v, k_cache, v_cache, md.slot_mapping, force_triton=self.backend == "triton")
        if self.fresh is not None:
            return self.fresh(layer_idx, q, k, v)
        if md.is_prefill:
            if md.cpu_kernels:
                return paged_prefill_attention_cpu(q, md.cu_seqlens_q, k_cache, v_cache, md.block_tables,
                                                   md.context_lens, self.scale)
            if self.backend == "flash":
                from flash_attn import flash_attn_varlen_func

                cu_seqlens_k = torch.nn.functional.pad(md.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
                return flash_attn_varlen_func(q, k_cache, v_cache, md.cu_seqlens_q, cu_seqlens_k, md.max_seqlen_q,
                                              md.max_context_len, softmax_scale=self.scale, causal=True,
                                              block_table=md.block_tables)
            if self.backend == "triton":
                return paged_prefill_attention_triton(q, md.cu_seqlens_q, k_cache, v_cache, md.block_tables,
                                                      md.context_lens, self.scale, md.max_seqlen_q)
            return paged_prefill_attention_torch(q, md.cu_seqlens_q, k_cache, v_cache, md.block_tables,
                                                 md.context_lens, self.scale, md.paged_prefill)
        if self.backend == "flash":
            from flash_attn import flash_attn_with_kvcache

            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=md.context_lens,
                                          block_table=md.block_tables, softmax_scale=self.scale, causal=True)
            return out.squeeze(1)
        if self.backend == "triton":
            return paged_decode_attention(q, k_cache, v_cache, md.block_tables, md.context_lens, self.scale,
                                          force_triton=True)
        if md.cpu_kernels:
            return paged_decode_attention_cpu(q, k_cache, v_cache, md.block_tables, md.context_lens, self.scale)
        if md.shared_prefix is not None:
            return shared_prefix_decode_attention(q, k_cache, v_cache, md.shared_prefix, self.scale)
        return paged_decode_attention_torch(q, k_cache, v_cache, md.block_tables, md.context_lens, self.scale,
                                            md.paged_gather)
