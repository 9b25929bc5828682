"""Write one step's new keys and values into the paged KV cache.

Cache layout (per layer, shared with flash-attn's paged kernels): k_cache and v_cache are
[num_blocks, block_size, num_kv_heads, head_dim]. Token t goes to slot slot_mapping[t] =
block_id * block_size + offset; a negative slot means "do not store" (padding tokens, e.g. the
rows a captured CUDA graph runs for absent sequences).

`store_kvcache` runs the Triton kernel on CUDA (or where asked to), the C one on CPU where the CPU kernels
are built (csrc/cpu/kv_cache_store.c: one copy per token, where the torch path costs several ops per layer),
and `store_kvcache_torch`, the reference of both, elsewhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from promptcot_engine.kernels import cpu_library


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    block_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: copies its [num_kv_heads, head_dim] key and value to its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    key = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask)
    value = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask)
    dst = ((slot // block_size) * cache_stride_block + (slot % block_size) * cache_stride_slot
           + heads * cache_stride_head + dims)
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    # the kernel addresses the innermost dimension with unit stride
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    T, num_kv_heads, head_dim = key.shape
    _store_kvcache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    # index the two leading dimensions rather than a flattened view, which would silently copy a cache
    # whose blocks are not contiguous with each other
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def store_kvcache_cpu(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """The C store: caches contiguous; key/value rows (one token's heads) contiguous, of the cache's dtype."""
    if not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype and k_cache.is_contiguous()
            and v_cache.is_contiguous()):
        raise ValueError(f"store_kvcache_cpu copies bytes: key/value dtype {key.dtype}/{value.dtype} must be the "
                         f"caches' ({k_cache.dtype}/{v_cache.dtype}), and the caches contiguous")
    key = key if key.stride(-1) == 1 and key.stride(-2) == key.shape[-1] else key.contiguous()
    value = value if value.stride(-1) == 1 and value.stride(-2) == value.shape[-1] else value.contiguous()
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    cpu_library.library.pce_cpu_store_kvcache(
        key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        key.shape[0], key.shape[1] * key.shape[2], key.stride(0), value.stride(0), key.element_size())


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, force_triton: bool = False) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = key/value[t] for every t with a slot >= 0;
    key, value [T, num_kv_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim]; in place.
    force_triton: the Triton kernel whatever the device (on CPU tensors, Triton's interpreter runs it)."""
    if (key.dim() != 3 or value.shape != key.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape
            or k_cache.shape[2:] != key.shape[1:] or slot_mapping.shape != key.shape[:1]):
        raise ValueError(f"expected key/value [T, nkv, d], caches [blocks, block_size, nkv, d], slot_mapping [T]; got "
                         f"{tuple(key.shape)}, {tuple(value.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}, "
                         f"{tuple(slot_mapping.shape)}")
    if key.is_cuda or force_triton:
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must share strides, with a unit stride on head_dim")
        store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping)
    elif cpu_library.takes(key, value, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous():
        store_kvcache_cpu(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_torch(key, value, k_cache, v_cache, slot_mapping)
