"""The engine's Triton kernels launched through their own wrappers as on a GPU, without one.

A stand-in driver reports a CUDA target (sm_90 for the H100/H200, sm_80 for the A100) and its limits. Each
launch then goes through Triton's launch path as on the device: the wrapper's grid, constexprs and num_warps,
Triton's specialization of the arguments (pointer alignment, integers divisible by 16 or equal to 1), the
compile to a cubin by ptxas, and the load-time checks (shared memory against the device's limit; threads
against what the kernel's registers, read from the cubin by cuobjdump, allow a block). Only the launch itself
does nothing.

Run as a child process without TRITON_INTERPRET (an interpreting process has its kernels bound to the
interpreter): `python -m tests.kernels.gpu_launch ARCH`; prints one JSON line per launch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# (shared memory a block may opt into, registers per SM) of the targets checked
DEVICE_LIMITS = {90: (232448, 65536), 80: (166912, 65536)}


class _Utils:
    def __init__(self, arch: int, launches: list):
        self.max_shared, self.registers_per_sm = DEVICE_LIMITS[arch]
        self.launches = launches

    def get_device_properties(self, device):
        return {"max_shared_mem": self.max_shared}  # all that Triton's launch path reads

    def load_binary(self, name, cubin, shared, device):
        registers, local_bytes = cubin_resource_usage(cubin)
        # a block needs a register file share for every thread, allocated per warp in units of 256
        per_warp = -(-registers * 32 // 256) * 256
        max_threads = min(1024, self.registers_per_sm // per_warp * 32)
        self.launches.append({"kernel": name, "shared": shared, "registers": registers, "local_bytes": local_bytes,
                              "max_threads": max_threads})
        return None, None, registers, local_bytes, max_threads


def cubin_resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread: spills and stack) as ptxas allocated them."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    registers = int(re.search(r"REG:(\d+)", report).group(1))
    local = int(re.search(r"STACK:(\d+)", report).group(1)) + int(re.search(r"LOCAL:(\d+)", report).group(1))
    return registers, local


class StandInDriver:
    """What Triton's launch path asks of the active driver, for a device that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.launches: list[dict] = []
        self.utils = _Utils(arch, self.launches)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def launcher_cls(self, src, metadata):
        launches = self.launches

        def launch(grid_0, grid_1, grid_2, *rest):
            launches[-1]["grid"] = [grid_0, grid_1, grid_2]
            launches[-1]["num_warps"] = metadata.num_warps

        return launch


def launch_all(arch: int) -> list[dict]:
    """Every kernel the engine launches on CUDA, at the shapes of the models it serves, in each dtype."""
    import torch
    import triton

    driver = StandInDriver(arch)
    triton.runtime.driver.set_active(driver)
    from promptcot_engine.kernels.fused_linear_cross_entropy import cross_entropy_grad_triton
    from promptcot_engine.kernels.fused_logprob import fused_linear_logprob
    from promptcot_engine.kernels.kv_cache_store import store_kvcache_triton
    from promptcot_engine.kernels.paged_attention import paged_decode_attention_triton
    from promptcot_engine.kernels.paged_prefill_attention import paged_prefill_attention_triton

    cases = []  # (name, wrapper, args, kwargs)
    # (query heads, kv heads, head_dim): SmolLM2-135M, Qwen2.5-7B, a head_dim of 256
    for heads, kv_heads, head_dim in ((9, 3, 64), (28, 4, 128), (8, 1, 256)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            shape = f"{heads}/{kv_heads}x{head_dim} {str(dtype).split('.')[-1]}"
            k_cache = torch.zeros(6, 16, kv_heads, head_dim, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
            context_lens = torch.tensor([40, 17], dtype=torch.int32)
            new = torch.zeros(12, kv_heads, head_dim, dtype=dtype)
            cases.append((f"store_kvcache {shape}", store_kvcache_triton,
                          (new, new.clone(), k_cache, v_cache, torch.arange(12, dtype=torch.long)), {}))
            cases.append((f"paged_decode_attention {shape}", paged_decode_attention_triton,
                          (torch.zeros(2, heads, head_dim, dtype=dtype), k_cache, v_cache, tables, context_lens, 0.125),
                          {}))
            cases.append((f"paged_prefill_attention {shape}", paged_prefill_attention_triton,
                          (torch.zeros(12, heads, head_dim, dtype=dtype), torch.tensor([0, 5, 12], dtype=torch.int32),
                           k_cache, v_cache, tables, context_lens, 0.125), {"max_seqlen_q": 7}))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).split(".")[-1]
        for hidden_size, vocab in ((576, 49152), (3584, 152064)):  # SmolLM2's and Qwen2.5-7B's LM heads
            cases.append((f"linear_logprob H={hidden_size} V={vocab} {name}", fused_linear_logprob,
                          (torch.zeros(100, hidden_size, dtype=dtype), torch.zeros(vocab, hidden_size, dtype=dtype),
                           torch.zeros(100, dtype=torch.long)), {"num_splits": 4}))
            cases.append((f"cross_entropy_grad V={vocab} {name}", cross_entropy_grad_triton,
                          (torch.zeros(8, vocab, dtype=dtype), torch.zeros(8, dtype=torch.long), torch.ones(8),
                           torch.empty(8), torch.empty(8, vocab, dtype=dtype)), {}))
    results = []
    for case, wrapper, args, kwargs in cases:
        before = len(driver.launches)
        try:
            wrapper(*args, **kwargs)
        except Exception as e:  # noqa: BLE001: reported, the parent test names the case
            results.append({"case": case, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        results += [{"case": case, **entry} for entry in driver.launches[before:]]
        if len(driver.launches) == before:
            results.append({"case": case, "error": "no kernel launched"})
    return results


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    for row in launch_all(int(sys.argv[1])):
        print(json.dumps(row))
