"""The engine's decoder computes what transformers computes: full-vocabulary logits, fp32, max abs diff <= 1e-4."""
import json
import shutil

import pytest
import torch

from promptcot_engine.models.loader import load_model, resolve_model_path
from tests.reference import engine_logits, hf_gguf_model, hf_logits, hf_model

TOL = 1e-4


def random_sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_logits_match_transformers(tiny_model_dir):
    ours, checkpoint = load_model(tiny_model_dir, dtype="float32", device="cpu")
    ref = hf_model(tiny_model_dir)
    sequences = random_sequences(checkpoint.config.vocab_size, [1, 7, 33, 130])
    for a, b in zip(engine_logits(ours, sequences), hf_logits(ref, sequences)):
        assert (a - b).abs().max().item() <= TOL


def test_bf16_logits_close_to_transformers(tiny_llama_dir):
    ours, checkpoint = load_model(tiny_llama_dir, dtype="bfloat16", device="cpu")
    ref = hf_model(tiny_llama_dir, dtype=torch.bfloat16)
    sequences = random_sequences(checkpoint.config.vocab_size, [5, 40])
    for a, b in zip(engine_logits(ours, sequences), hf_logits(ref, sequences)):
        # same bf16 op order as transformers; the only freedom is the attention kernel's accumulation
        assert (a.float() - b.float()).abs().max().item() <= 0.05 * b.float().abs().max().item()


def test_transformers_4x_config_format(tmp_path):
    """config.json as transformers 4.x writes it (top-level rope_theta + rope_scaling) loads the same model."""
    from tests.tiny_checkpoints import tiny_checkpoint

    source = tiny_checkpoint("llama_gqa7")
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    config = json.loads((legacy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(config))
    assert rope["rope_type"] == "llama3"

    ours_legacy, checkpoint = load_model(legacy, dtype="float32", device="cpu")
    ours_new, _ = load_model(source, dtype="float32", device="cpu")
    assert checkpoint.config.rope_scaling["rope_type"] == "llama3"
    assert checkpoint.config.rope_theta == ours_new.config.rope_theta
    sequences = random_sequences(checkpoint.config.vocab_size, [300])  # beyond the original context: scaling matters
    ref = hf_logits(hf_model(source), sequences)
    for a, b, c in zip(engine_logits(ours_legacy, sequences), engine_logits(ours_new, sequences), ref):
        assert (a - c).abs().max().item() <= TOL
        assert (b - c).abs().max().item() <= TOL


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_gguf():
    """SmolLM2 read from the packaged GGUF by both: Q4_1/Q8_0 dequantized, Q/K rows un-permuted."""
    gguf_path = resolve_model_path("smollm2-135m-instruct")
    ours, checkpoint = load_model(gguf_path, dtype="float32", device="cpu")
    ref = hf_gguf_model(gguf_path)
    text = ["The sum of two odd numbers is even because", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"]
    sequences = [checkpoint.tokenizer.encode(t) for t in text] + random_sequences(49152, [64], seed=3)
    for a, b in zip(engine_logits(ours, sequences), hf_logits(ref, sequences)):
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.slow
def test_converted_smollm2_loads_in_both(smollm2_dir):
    """`promptcot convert` output: transformers and the engine compute the same logits from it."""
    ours, checkpoint = load_model(smollm2_dir, dtype="float32", device="cpu")
    ref = hf_model(smollm2_dir)
    sequences = [checkpoint.tokenizer.encode("Let x be a positive integer such that x^2 = 49. Then x =")]
    for a, b in zip(engine_logits(ours, sequences), hf_logits(ref, sequences)):
        assert (a - b).abs().max().item() <= TOL
