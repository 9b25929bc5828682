"""Keep freed CPU memory for reuse, as the CUDA caching allocator does on GPU; back the KV cache with huge pages.

glibc's malloc maps every allocation above its mmap threshold (at most 32 MiB) afresh and unmaps it on free.
A prefill step's activations ([tokens, intermediate_size] and the LM-head chunks) are above it, so each
was paying page faults on zeroed pages, step after step: about 15% of a scoring run on the 2-core box.
Raising the threshold and the trim threshold keeps those blocks in the heap for the next step. The cost is
the allocator's: the process's resident size no longer shrinks after a peak. It is process-wide, so it is
applied once, by the first engine on CPU, and only where the C library is glibc.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
MADV_HUGEPAGE = 14  # Linux's madvise advice (mman.h)
HUGE_PAGE_BYTES = 2 << 20
M_MMAP_THRESHOLD = -3
RETAINED_BYTES = 1 << 30  # allocations up to this size come from the heap; free space up to it stays there

_applied = False


def _libc_function(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (musl has neither function): nothing to tune
        return None


def retain_freed_memory() -> bool:
    """Apply the setting once; True when the C library took it."""
    global _applied
    if _applied:
        return True
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, RETAINED_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED_BYTES))
    return _applied


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system now (malloc_trim), so that the resident size is what is
    live: a memory measurement's baseline must not include what is merely kept for reuse."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        malloc_trim(0)


def advise_huge_pages(tensor) -> bool:
    """Ask Linux to back a large CPU tensor with transparent huge pages (madvise), before it is first written:
    decode attention reads a sequence's blocks from anywhere in the KV cache, and with 4 KiB pages nearly
    every block read also misses the TLB (about 10% of decode attention on the 2-core box). True when the
    advice was taken; where the system does not take it, the tensor is simply backed as before."""
    madvise = _libc_function("madvise")
    if madvise is None or tensor.device.type != "cpu":
        return False
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    begin = tensor.data_ptr()
    start = -(-begin // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES  # whole huge pages inside the tensor
    end = (begin + tensor.numel() * tensor.element_size()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return end > start and madvise(start, end - start, MADV_HUGEPAGE) == 0
