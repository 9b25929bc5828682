"""Paged decode attention on the CPU in C (csrc/cpu/paged_attention.c), through kernels/cpu_library.py.

The CPU's counterpart of the Triton decode kernel in paged_attention.py, with the same contract and the same
torch reference (`paged_decode_attention_torch`): one query token per sequence reads its keys and values
from the paged cache through its block table; fp32 or bf16 caches, fp32 arithmetic. It exists because the
same work as torch ops costs one small batched matrix product per sequence and KV head, whose fixed cost
dominates at decode (see the C file).
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE, DTYPE_CODES, LIBRARY_PATH, library, takes


def cpu_attention_kernels_apply(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the C decode and prefill attention kernels take these: built, CPU tensors of one dtype they
    take (fp32, bf16), a head size they take (a multiple of 16, <= 256)."""
    head_dim = q.shape[-1]
    return takes(q, k_cache) and head_dim % 16 == 0 and head_dim <= 256


def has_bf16_dot() -> bool:
    """Whether this CPU (and build) has the kernel's vdpbf16ps path for bf16 caches."""
    return CPU_KERNELS_AVAILABLE and bool(library.pce_cpu_has_bf16_dot())


def kernel_inputs(kind: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The attention kernels' inputs as the C side reads them (contiguous, int32 tables and lengths) and their
    output buffer (q's shape and dtype, contiguous; made when not given), or a clear error."""
    if not cpu_attention_kernels_apply(q, k_cache):
        raise RuntimeError(f"the CPU {kind}-attention kernel does not take q {q.dtype} {tuple(q.shape)} on {q.device} "
                           f"with a {k_cache.dtype} cache on {k_cache.device} (or is not built: {LIBRARY_PATH})")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # views of one layer: already contiguous
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    return (q, k_cache, v_cache, block_tables.to(torch.int32).contiguous(), context_lens.to(torch.int32).contiguous(),
            out)


def paged_decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               out: torch.Tensor | None = None, bf16_dot: bool = True) -> torch.Tensor:
    """q [B, num_heads, head_dim] -> [B, num_heads, head_dim] (into `out` when given: contiguous, q's shape and
    dtype); the paged_decode_attention contract. Like the Triton kernel it trusts the block tables: every
    block a context reaches must be in the cache. `bf16_dot`: bf16 on a CPU with AVX512-BF16 (and head_dim a
    multiple of 32) takes the vdpbf16ps path (`has_bf16_dot`); False keeps it on the fp32 one."""
    q, k_cache, v_cache, block_tables, context_lens, out = kernel_inputs("decode", q, k_cache, v_cache, block_tables,
                                                                         context_lens, out)
    B, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if B == 0:
        return out
    status = library.pce_cpu_paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), B, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], scale,
        DTYPE_CODES[q.dtype], int(bf16_dot))
    raise_for_status(status, "paged_decode_attention_cpu", q, k_cache)
    return out


def raise_for_status(status: int, name: str, q: torch.Tensor, k_cache: torch.Tensor, detail: str = "") -> None:
    """The attention kernels' return codes as exceptions: -1 no memory, -2 inputs the kernel does not take."""
    if status == -1:
        raise MemoryError(f"{name}: no memory for its work buffers")
    if status != 0:
        raise ValueError(f"{name}: shapes it does not take: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}{detail}")
