"""`promptcot train`: a run writes a model transformers loads and metrics.jsonl; --resume continues it;
bad input is one `error:` line naming file and line, exit code 2."""
import json

import pytest
from click.testing import CliRunner

from promptcot_engine.cli import main
from promptcot_engine.models.loader import load_model
from tests.tiny_checkpoints import tiny_checkpoint

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Find the number of positive integers n.",
             "def solve(n): return sum(range(n))", "In triangle ABC, AB = 13 and BC = 14."]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": s[:10], "completion": s[10:]} for s in SENTENCES]
    lines.append({"prompt": "Q", "completion": "The quick brown fox jumps over the lazy dog. " * 4})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_train_then_resume(tmp_path, data_file):
    out = tmp_path / "out"
    common = ["--model", tiny_checkpoint("llama"), "--data", data_file, "--output", out, "--lr", "1e-3",
              "--epochs", "2", "--batch-size", "2", "--grad-accum", "2", "--max-length", "32", "--warmup", "0.25"]
    result = run(*common, "--save-steps", "2")
    assert result.exit_code == 0, result.output
    assert "longer than --max-length 32: 1 truncated, 0 skipped (of 5)" in result.output and "wrote" in result.output
    assert (out / "checkpoint-2" / "training_state.pt").is_file()
    model, checkpoint = load_model(out, dtype="float32", device="cpu")
    assert checkpoint.tokenizer.eos_token_id is not None
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == {"event": "data", "records": 5, "examples": 5, "truncated": 1, "skipped_too_long": 0,
                         "objective": "sft", "total_steps": 6}
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and {"loss", "lr", "tokens_per_s"} <= set(steps[0])

    # an existing run directory is only reused on purpose; --resume alone takes its latest checkpoint
    assert run(*common).exit_code == 2
    result = run(*common, "--resume")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed_steps = [e for e in events if e["event"] == "step"][4:]
    assert [e["event"] for e in events].count("resume") == 1
    assert [e["loss"] for e in resumed_steps] == [e["loss"] for e in steps[4:]]


@pytest.mark.parametrize("line, message", [
    ('"just a string"', "data.jsonl:3: expected a JSON object"),
    ('{"prompt": "Q"}', "data.jsonl:3: missing field 'completion'"),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n")
    result = run("--model", tiny_checkpoint("llama"), "--data", data, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_dpo_records_are_required_for_dpo(tmp_path, data_file):
    result = run("--model", tiny_checkpoint("llama"), "--data", data_file, "--output", tmp_path / "out",
                 "--objective", "dpo", "--beta", "0.2")
    assert result.exit_code == 2 and "data.jsonl:1: missing field 'chosen'" in result.output
