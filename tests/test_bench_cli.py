"""`promptcot bench` on a tiny checkpoint: both sides do the same work, and the JSON line says so. No
timing is asserted: only that the figures are there and that the engine and transformers agree."""
import json

import pytest
from click.testing import CliRunner

from promptcot_engine import LLM
from promptcot_engine.benchmarks.common import run_side
from promptcot_engine.benchmarks.products_ceiling import engine_products, products_ceiling, products_flops
from promptcot_engine.kernels.cpu_linear import ONEDNN_AVAILABLE
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
    assert (row["device"], row["dtype"]) == ("cpu", "float32")  # what the figures were measured in
    assert row["generated_tokens"] == row["hf_generated_tokens"] == 3 * 2 * 5
    assert row["speedup_vs_hf"] == row["engine_tokens_per_s"] / row["hf_tokens_per_s"]
    assert row["ceiling_gflops"] > 0
    assert row["engine_fraction_of_ceiling"] == pytest.approx(
        row["engine_gflops"] / row["ceiling_gflops"])
    assert row["speedup_ceiling_vs_hf"] == pytest.approx(
        row["hf_seconds"] * row["ceiling_gflops"] / row["products_gflop"])


def test_products_flops_equal_a_hand_count_from_the_config():
    model_dir = tiny_checkpoint("llama")
    config = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q_width, kv_width = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    body = layers * (h * q_width + 2 * h * kv_width + q_width * h + 3 * h * inter)
    head = h * config["vocab_size"]
    model = LLM(model_dir, dtype="float32", device="cpu").engine.model
    # prompts of 5 and 9 tokens, n=3 samples of 4 tokens each: 14 prompt rows, 3 more rows per sample, and
    # the LM head at each prompt's last token and at those 3 rows of each sample
    assert products_flops(model, [5, 9], 3, 2 * 3 * 4) == 2 * ((14 + 18) * body + (2 + 18) * head)
    assert 0 < products_ceiling(model, rows=8, repeats=1) < float("inf")
    # timed as the engine runs them: q/k/v and gate/up as one product each where oneDNN merged them
    assert len(engine_products(model)) == config["num_hidden_layers"] * (4 if ONEDNN_AVAILABLE else 7) + 1


def test_score_sides_agree_on_the_log_probs(tmp_path):
    model = str(tiny_checkpoint("qwen2"))
    row = bench(tmp_path, "score", "--model", model, "--num-pairs", "4", "--pairs-per-context", "2",
                "--context-len", "20", "--continuation-len", "12")
    assert row["scored_tokens"] == 4 * 12
    assert (row["device"], row["dtype"]) == ("cpu", "float32")
    # per context, its first pair computes all 32 tokens; the other reuses the context's full block of 16 and
    # computes the rest (a partial block is never shared)
    assert row["engine_prefilled_tokens"] == 2 * (20 + 12) + 2 * (20 - 16 + 12)
    assert row["max_relative_sum_difference"] < 1e-5
    assert row["engine_peak_extra_mb"] >= 0 and row["hf_peak_extra_mb"] > 0


def test_a_failing_side_reports_its_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="no-such-model") as info:
        run_side("promptcot_engine.benchmarks.score", "engine",
                 ["--model", str(missing), "--device", "cpu", "--dtype", "auto", "--num-pairs", "2",
                  "--pairs-per-context", "1", "--context-len", "4", "--continuation-len", "4"])
    assert "engine side of promptcot_engine.benchmarks.score exited with status" in str(info.value)


def test_a_side_needs_every_option():
    """The sides take no defaults of their own: run_side's callers pass every option."""
    with pytest.raises(RuntimeError, match="required: --k, --max-tokens"):
        run_side("promptcot_engine.benchmarks.estep", "engine",
                 ["--model", "m", "--device", "cpu", "--dtype", "auto", "--num-pairs", "1"])
