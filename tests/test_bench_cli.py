"""`promptcot bench` on a tiny checkpoint: both sides do the same work, and the JSON line says so. No
timing is asserted: only that the figures are there and that the engine and transformers agree."""
import json

import pytest
from click.testing import CliRunner

from promptcot_engine.benchmarks.common import run_side
from promptcot_engine.cli import main
from tests.tiny_checkpoints import tiny_checkpoint


def bench(tmp_path, *args) -> dict:
    output = tmp_path / "results.jsonl"
    result = CliRunner().invoke(main, ["bench", *args, "--device", "cpu", "--dtype", "float32", "--output", str(output)])
    assert result.exit_code == 0, result.output
    lines = output.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_generate_both_sides_generate_the_same_tokens(tmp_path):
    model = str(tiny_checkpoint("llama"))
    row = bench(tmp_path, "generate", "--model", model, "--num-prompts", "3", "--n", "2", "--max-tokens", "5")
    assert row["bench"] == "generate"
    assert row["generated_tokens"] == row["hf_generated_tokens"] == 3 * 2 * 5
    assert row["speedup_vs_hf"] == row["engine_tokens_per_s"] / row["hf_tokens_per_s"]


def test_score_sides_agree_on_the_log_probs(tmp_path):
    model = str(tiny_checkpoint("qwen2"))
    row = bench(tmp_path, "score", "--model", model, "--num-pairs", "4", "--pairs-per-context", "2",
                "--context-len", "20", "--continuation-len", "12")
    assert row["scored_tokens"] == 4 * 12
    # per context, its first pair computes all 32 tokens; the other reuses the context's full block of 16 and
    # computes the rest (a partial block is never shared)
    assert row["engine_prefilled_tokens"] == 2 * (20 + 12) + 2 * (20 - 16 + 12)
    assert row["max_relative_sum_difference"] < 1e-5
    assert row["engine_peak_extra_mb"] >= 0 and row["hf_peak_extra_mb"] > 0


def test_a_failing_side_reports_its_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="no-such-model") as info:
        run_side("promptcot_engine.benchmarks.score", "engine", ["--model", str(missing), "--device", "cpu"])
    assert "engine side of promptcot_engine.benchmarks.score exited with status" in str(info.value)
