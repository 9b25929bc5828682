"""The engine's CPU kernels in C (csrc/cpu/), one shared library built with the package (setup.py) where a C
compiler is found, called through ctypes. `CPU_KERNELS_AVAILABLE` says whether it was built; without it the
engine runs the same operations as torch code.

Loaded after torch on purpose: its OpenMP runtime then binds to the libgomp torch already loaded (the same
soname), so both share one thread pool and `torch.set_num_threads` applies to the kernels too.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

LIBRARY_PATH = Path(__file__).with_name("libpromptcot_cpu.so")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' dtypes, as csrc/cpu/vector.h numbers them

_pointer, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "pce_cpu_paged_decode_attention": [_pointer] * 6 + [_i64] + [_i32] * 4 + [_i64, _f32, _i32, _i32],
    "pce_cpu_paged_prefill_attention": [_pointer] * 7 + [_i64] + [_i32] * 4 + [_i64, _f32, _i32],
    "pce_cpu_logprob_tile": [_pointer] + [_i64] * 4 + [_pointer] * 5,
    "pce_cpu_has_bf16_dot": [],
    "pce_cpu_store_kvcache": [_pointer] * 5 + [_i64] * 4 + [_i32],
    "pce_cpu_rms_norm": [_pointer] * 4 + [_i64, _i32, _i64, _f32, _i32],
    "pce_cpu_rotary": [_pointer] * 4 + [_i64, _i32, _i32, _i64, _i64, _i32],
    "pce_cpu_sample_rows": [_pointer] * 3 + [_i64] * 3 + [_i32],
}


def _load() -> ctypes.CDLL | None:
    if not LIBRARY_PATH.is_file():
        return None
    library = ctypes.CDLL(str(LIBRARY_PATH))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(library, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return library


library = _load()
CPU_KERNELS_AVAILABLE = library is not None


def takes(*tensors: torch.Tensor) -> bool:
    """Built, and every tensor on the CPU in one dtype the kernels take (fp32, bf16). Checked once per layer
    op at decode, so written for speed: a plain loop over cheap attributes (a generator and `device.type`
    cost several times more)."""
    dtype = tensors[0].dtype
    if not CPU_KERNELS_AVAILABLE or dtype not in DTYPE_CODES:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return False
    return True
