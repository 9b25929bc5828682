"""Training throughput and memory: transformers' naive step (full-logits cross-entropy) against the
Trainer on the same SmolLM2-135M batch of 8 x 512 tokens (see promptcot_engine/benchmarks/train.py). Asserts what does not
depend on the clock: both sides compute the same loss, and the Trainer's peak memory is at most 60% of
the naive run's; tokens/s and their ratio are printed and recorded, not asserted.

Run: pytest bench/test_bench_train.py --benchmark-only -s   (several minutes on a laptop CPU)
"""
import pytest

from promptcot_engine.benchmarks.train import run_train_bench


@pytest.mark.slow
def test_bench_train(benchmark, record_result):
    result = benchmark.pedantic(run_train_bench, kwargs=dict(batch=8, seq_len=512, steps=3), rounds=1, iterations=1)
    record_result(result)
    assert result["engine_first_loss"] == pytest.approx(result["transformers_first_loss"], rel=1e-4)
    assert result["peak_memory_ratio"] <= 0.6
