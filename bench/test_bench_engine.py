"""The engine's two throughput targets as pytest-benchmark cases, on the workloads of `promptcot bench`:
sampling (16 prompts x n=8 x 128 new tokens at temperature 1, SmolLM2-135M) against transformers' generate,
and teacher-forced scoring (64 pairs of 512 + 512 tokens, each context shared by 8 pairs) against
transformers' forward + log_softmax. Both sides run in the same test; the figures and ratios are printed
and recorded in the benchmark's extra_info, never asserted (the clock is the machine's). Asserted: both
sides did the same work, and the score sides agree.

A third case samples from a model with next to no compute (2 layers of width 64): 256 seeded samples whose
steps cost what the engine's own bookkeeping costs (scheduling, inputs, sampling, outputs), the part a GPU
waits through at every step of a small model. transformers' generate on the same model is the reference.

Run: pytest bench/test_bench_engine.py --benchmark-only -s   (about 3 + 2, 5 and 1 minutes on a 2-core CPU)
"""
import pytest

from promptcot_engine.benchmarks.generate import run_generate_bench
from promptcot_engine.benchmarks.score import run_score_bench


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_generate(benchmark, record_result, dtype):
    result = benchmark.pedantic(run_generate_bench, kwargs=dict(dtype=dtype), rounds=1, iterations=1)
    record_result(result)
    assert result["generated_tokens"] == result["hf_generated_tokens"] == 16 * 8 * 128


@pytest.mark.slow
def test_bench_generate_overhead_bound(benchmark, record_result):
    from tests.tiny_checkpoints import tiny_checkpoint

    kwargs = dict(model=str(tiny_checkpoint("llama")), num_prompts=32, n=8, max_tokens=128, dtype="float32", seeded=True)
    result = benchmark.pedantic(run_generate_bench, kwargs=kwargs, rounds=1, iterations=1)
    record_result(result)
    assert result["generated_tokens"] == result["hf_generated_tokens"] == 32 * 8 * 128


@pytest.mark.slow
def test_bench_score(benchmark, record_result):
    result = benchmark.pedantic(run_score_bench, rounds=1, iterations=1)
    record_result(result)
    assert result["scored_tokens"] == 64 * 512
    assert result["max_relative_sum_difference"] < 1e-4
