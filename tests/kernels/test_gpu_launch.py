"""Every Triton kernel the engine launches on CUDA, launched through its wrapper for the H100/H200 (sm_90) and
the A100 (sm_80) without a GPU: compiled to a cubin as the device would compile it and held to the device's
limits (see gpu_launch.py). The interpreter accepts code the GPU compiler rejects, and tile sizes that no
device has the shared memory for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WRAPPERS = {"store_kvcache": "_store_kvcache_kernel", "paged_decode_attention": "_paged_decode_attention_kernel",
            "paged_prefill_attention": "_paged_prefill_attention_kernel",
            "linear_logprob": "_linear_logprob_partials_kernel", "cross_entropy_grad": "_cross_entropy_grad_kernel"}


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def launches(request):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_launch", str(request.param)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode and "ptxas" in result.stderr:
        pytest.skip(f"no ptxas to finish the compile: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, [json.loads(line) for line in result.stdout.splitlines()]


def test_every_kernel_compiles_and_fits_the_device(launches):
    arch, rows = launches
    failed = [f"{row['case']}: {row['error']}" for row in rows if "error" in row]
    assert not failed, "\n".join(failed)
    assert {row["case"].split()[0] for row in rows} == set(WRAPPERS)
    for row in rows:
        assert row["kernel"] == WRAPPERS[row["case"].split()[0]]
        assert row["num_warps"] * 32 <= row["max_threads"]
    decode = [row for row in rows if row["case"].startswith("paged_decode_attention 28/4x128")]
    assert decode and all(row["grid"] == [2, 4, 1] for row in decode)  # a program per (sequence, kv head)


def test_half_precision_attention_and_scoring_keep_to_registers_on_sm90(launches):
    """The H200's main paths (bf16/fp16 models of head_dim <= 128) run without spilling registers to local
    memory; fp32, a head_dim of 256 and the A100 may spill (slower, still correct)."""
    arch, rows = launches
    if arch != 90:
        pytest.skip("spills are held to on sm_90 only")
    main_paths = [row for row in rows if ("bfloat16" in row["case"] or "float16" in row["case"])
                  and "x256" not in row["case"]]
    assert len(main_paths) == 20  # 2 shapes x 2 dtypes x 3 attention wrappers, 2 x 2 x 2 for the LM head's
    spilled = [f"{row['case']}: {row['local_bytes']} bytes" for row in main_paths if row["local_bytes"]]
    assert not spilled, spilled
