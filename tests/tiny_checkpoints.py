"""Small random checkpoints saved with transformers, cached under .test_cache/ (built once per machine).

Each has a tiny byte-level BPE tokenizer trained here (vocabulary 389: not a power of two) with a ChatML
chat template, so tokenization, chat formatting and EOS handling are exercised like a real checkpoint's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CACHE = Path(os.environ.get("PROMPTCOT_TEST_CACHE", Path(__file__).resolve().parent.parent / ".test_cache"))
VOCAB_SIZE = 389
# Qwen checkpoints ship this split in tokenizer.json (and transformers' Qwen2Tokenizer imposes it)
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Let x be a real number such that x^2 + 3x + 2 = 0.",
    "Find the number of positive integers n less than 1000 such that n divides 2^n + 1.",
    "def solve(n):\n    return sum(i * i for i in range(n))\n\nprint(solve(10))\n",
    "Foundational Concepts:\n1. Modular arithmetic\n2. Combinatorics\nDifficulty Level: AIME",
    "<!-- BEGIN RATIONALE --> think about it <!-- END RATIONALE --> <!-- BEGIN PROBLEM --> a problem <!-- END PROBLEM -->",
    "In triangle ABC, AB = 13, BC = 14 and CA = 15. Compute the area, then the inradius r of the triangle.",
] * 20

# name -> transformers config fields (architecture chosen by model_type)
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "llama_gqa7": dict(model_type="llama", hidden_size=448, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=7, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "qwen2": dict(model_type="qwen2", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True),
}


def tiny_tokenizer_dir() -> Path:
    path = CACHE / "tiny_tokenizer"
    if (path / "tokenizer.json").is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML, "clean_up_tokenization_spaces": False}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def tiny_checkpoint(name: str, seed: int = 0) -> Path:
    path = CACHE / f"tiny_{name}_{seed}_v2"
    if (path / "model.safetensors").is_file():
        return path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok_dir = tiny_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    fields = dict(TINY_CONFIGS[name])
    model_type = fields.pop("model_type")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=2048,
                                  initializer_range=0.1, eos_token_id=eos, bos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make the norms and biases matter, so a mistake in applying them shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name or "bias" in param_name:
                param.add_(torch.randn_like(param) * 0.2)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model_type.startswith("qwen"):
        _use_qwen_split(tmp / "tokenizer.json")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _use_qwen_split(tokenizer_file: Path) -> None:
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.save(str(tokenizer_file))


def smollm2_hf_dir() -> Path:
    """The packaged SmolLM2 GGUF converted by `promptcot convert` (the engine's own converter)."""
    path = CACHE / "smollm2_hf"
    if (path / "model.safetensors").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "promptcot_engine.cli", "convert", "--model", "smollm2-135m-instruct",
                    "--output", str(tmp)], check=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
