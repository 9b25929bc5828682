"""Teacher-forced scoring on the CPU: the engine's CPU path (tiled_linear_logprob_cpu: vocabulary tiles with
the C log-sum-exp) and the chunked torch path against the naive computation (full logits, log_softmax,
gather, argmax) on the same input, SmolLM2-135M's LM head (H=576, V=49152) over 2048 tokens
in fp32. Prints tokens/s and achieved GFLOP/s (the LM-head matmul dominates: compare with the machine's
peak), the speed ratio, and the peak extra resident memory of each, measured in a fresh process
(`python bench/test_bench_kernels.py naive|chunked|tiled`) since tracemalloc does not see torch's CPU tensors.

On a GPU: the Triton kernel's TFLOP/s against the card's bf16 peak, and against the full-logits computation.

Run: pytest bench/test_bench_kernels.py --benchmark-only
"""
import json
import subprocess
import sys

import pytest
import torch

from promptcot_engine.benchmarks.logprob_kernel import logprob_inputs, logprob_kernel_roofline, torch_linear_logprob
from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.cpu_logprob import tiled_linear_logprob_cpu
from promptcot_engine.kernels.fused_logprob import IGNORE_INDEX, chunked_linear_logprob, fused_linear_logprob

T, H, V = 2048, 576, 49152
FLOPS = 2 * T * H * V
RESULTS = {}


def make_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g).div_(H ** 0.5)
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, targets


def tiled_linear_logprob(hidden, weight, targets):
    return tiled_linear_logprob_cpu(hidden, weight, targets, IGNORE_INDEX)


FUNCTIONS = {"naive": torch_linear_logprob, "chunked": chunked_linear_logprob, "tiled": tiled_linear_logprob}


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_peak_extra_rss(name):
    """In this (fresh) process: build the inputs, reset the peak-RSS mark, run once; bytes above the start."""
    inputs = make_inputs()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    with torch.no_grad():
        FUNCTIONS[name](*inputs)
    return (_status_kib("VmHWM") - before) * 1024


def peak_extra_rss_in_subprocess(name):
    result = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["peak_extra_rss_bytes"]


@pytest.mark.parametrize("name", ["naive", "chunked", "tiled"])
def test_bench_linear_logprob(benchmark, capsys, name):
    if name == "tiled" and not CPU_KERNELS_AVAILABLE:
        pytest.skip("the CPU kernels are not built (no compiler)")
    inputs = make_inputs()
    with torch.no_grad():
        benchmark.pedantic(FUNCTIONS[name], args=inputs, rounds=2, iterations=1)
    seconds = benchmark.stats.stats.mean
    peak = peak_extra_rss_in_subprocess(name)
    RESULTS[name] = T / seconds
    benchmark.extra_info.update(tokens_per_s=T / seconds, gflops=FLOPS / seconds / 1e9, peak_extra_rss_bytes=peak)
    with capsys.disabled():
        print(f"\n{name}: {T / seconds:,.0f} tokens/s, {FLOPS / seconds / 1e9:.1f} GFLOP/s, "
              f"peak extra RSS {peak / 2**20:,.0f} MiB (full fp32 logits: {T * V * 4 / 2**20:,.0f} MiB)")
        if name != "naive" and "naive" in RESULTS:
            print(f"{name} / naive throughput: {RESULTS[name] / RESULTS['naive']:.2f}x")


# the Triton kernel on the GPU at SmolLM2-135M's LM head and at a 7B model's (Qwen2.5-7B: H=3584, V=152064)
GPU_HEADS = {"smollm2_135m": (H, V), "qwen2.5_7b": (3584, 152064)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel's throughput needs a GPU")
@pytest.mark.parametrize("head", sorted(GPU_HEADS))
def test_bench_fused_logprob_gpu(benchmark, record_result, head):
    """The fused Triton kernel in bf16 on an E-step-sized batch of scored tokens: achieved TFLOP/s of the
    LM-head product it fuses against the card's bf16 peak, and against the full-logits computation it
    replaces, on the same input (benchmarks/logprob_kernel.py)."""
    tokens, (hidden_size, vocab) = 16384, GPU_HEADS[head]
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) / hidden_size ** 0.5).bfloat16()
    hidden, targets = logprob_inputs(tokens, weight)

    def run():
        fused_linear_logprob(hidden, weight, targets)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    record_result(logprob_kernel_roofline(tokens, weight))


if __name__ == "__main__":
    print(json.dumps({"peak_extra_rss_bytes": measure_peak_extra_rss(sys.argv[1])}))
