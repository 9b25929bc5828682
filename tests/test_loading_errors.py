"""Bad checkpoints raise one clear InputError naming the file; the CLI prints one `error:` line and exits 2."""
import json
import shutil
import subprocess
import sys

import pytest

from promptcot_engine.errors import InputError
from promptcot_engine.models.loader import load_model, resolve_model_path
from tests.tiny_checkpoints import tiny_checkpoint


@pytest.fixture
def checkpoint_copy(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), path)
    return path


def run_convert(model, tmp_path):
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "promptcot_engine.cli", "convert", "--model", str(model), "--output", str(out)],
                            capture_output=True, text=True)
    return result, out


def expect_error(model, fragment, tmp_path):
    with pytest.raises(InputError) as info:
        load_model(model, dtype="float32", device="cpu")
    assert fragment in str(info.value)
    result, out = run_convert(model, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert not out.exists()
    return str(info.value)


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), tmp_path)


def test_unknown_model_name(tmp_path):
    expect_error("no-such-model-name", "no-such-model-name", tmp_path)


def test_missing_config(checkpoint_copy, tmp_path):
    (checkpoint_copy / "config.json").unlink()
    expect_error(checkpoint_copy, str(checkpoint_copy / "config.json"), tmp_path)


def test_no_weights(checkpoint_copy, tmp_path):
    (checkpoint_copy / "model.safetensors").unlink()
    message = expect_error(checkpoint_copy, str(checkpoint_copy), tmp_path)
    assert "no weights" in message


def test_truncated_safetensors(checkpoint_copy, tmp_path):
    weights = checkpoint_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_error(checkpoint_copy, str(weights), tmp_path)


def test_missing_shard(checkpoint_copy, tmp_path):
    weights = checkpoint_copy / "model.safetensors"
    weights.rename(checkpoint_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(checkpoint_copy, "model-00002-of-00002.safetensors", tmp_path)


def test_mismatched_tensors_are_named(checkpoint_copy, tmp_path):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] += 1
    config["num_hidden_layers"] += 1
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    message = expect_error(checkpoint_copy, "mis-shaped tensors", tmp_path)
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "missing tensors: model.layers.2." in message


def test_unsupported_architecture(checkpoint_copy, tmp_path):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    message = expect_error(checkpoint_copy, "MambaForCausalLM", tmp_path)
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_malformed_config(checkpoint_copy, tmp_path):
    (checkpoint_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    expect_error(checkpoint_copy, str(checkpoint_copy / "config.json"), tmp_path)


def test_missing_tokenizer(checkpoint_copy, tmp_path):
    (checkpoint_copy / "tokenizer.json").unlink()
    expect_error(checkpoint_copy, str(checkpoint_copy / "tokenizer.json"), tmp_path)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_corrupt_gguf(tmp_path, damage):
    source = resolve_model_path("smollm2-135m-instruct")
    corrupt = tmp_path / "corrupt.gguf"
    with source.open("rb") as f:
        head = f.read(4 << 20)
    corrupt.write_bytes(b"XXXX" + head[4:] if damage == "magic" else head)
    expect_error(corrupt, str(corrupt), tmp_path)
