"""GGUF files (llama.cpp's format), read with the `gguf` package: config and tokenizer from the metadata,
weights dequantized to fp32 and renamed to transformers' names."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from promptcot_engine.errors import InputError
from promptcot_engine.models.model_config import ModelConfig
from promptcot_engine.models.tokenizer import Tokenizer

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFCheckpoint:
    def __init__(self, path: Path):
        import gguf  # imported here: only GGUF users pay for it

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
            self.fields = {name: field.contents() for name, field in self.reader.fields.items()}
        except Exception as e:  # the reader raises ValueError, struct and numpy errors on damaged files
            raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensor_names = {t.name for t in self.reader.tensors}
        self.config = self._read_config()
        self.tokenizer = Tokenizer.from_gguf_fields(self.fields, str(path))

    def _field(self, key: str, default=None):
        value = self.fields.get(key, default)
        if value is None:
            raise InputError(f"{self.path}: GGUF metadata lacks {key!r}")
        return value

    def _read_config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in _ARCHITECTURES:
            raise InputError(f"{self.path}: unsupported architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
        if "rope_freqs.weight" in self.tensor_names:
            raise InputError(f"{self.path}: per-dimension rope_freqs (llama3 rope scaling in GGUF) is not supported; "
                             "convert the original HF checkpoint instead")
        a = lambda key, default=None: self._field(f"{arch}.{key}", default)  # noqa: E731
        hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
        scaling = None
        if self.fields.get(f"{arch}.rope.scaling.type") in ("linear", "yarn"):
            scaling = {"rope_type": self.fields[f"{arch}.rope.scaling.type"], "factor": float(a("rope.scaling.factor"))}
            if f"{arch}.rope.scaling.original_context_length" in self.fields:
                scaling["original_max_position_embeddings"] = int(a("rope.scaling.original_context_length"))
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
        hf = {
            "architectures": [_ARCHITECTURES[arch]],
            "model_type": arch,
            "vocab_size": int(self.fields.get(f"{arch}.vocab_size") or len(self._field("tokenizer.ggml.tokens"))),
            "hidden_size": hidden,
            "intermediate_size": int(a("feed_forward_length")),
            "num_hidden_layers": int(a("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(a("attention.head_count_kv", heads)),
            "head_dim": int(a("attention.key_length", hidden // heads)),
            "hidden_act": "silu",
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(a("rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
            "max_position_embeddings": int(a("context_length")),
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "bos_token_id": self.fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "torch_dtype": "float32",
        }
        if arch == "llama":
            hf["attention_bias"] = "blk.0.attn_q.bias" in self.tensor_names
            hf["mlp_bias"] = False
        elif arch == "qwen3":
            hf["attention_bias"] = "blk.0.attn_q.bias" in self.tensor_names
        return ModelConfig.from_hf_dict(hf, source=str(self.path))

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        import gguf

        c = self.config
        for tensor in self.reader.tensors:
            name = _hf_name(tensor.name)
            if name is None:
                yield tensor.name, torch.empty(0)  # reported as unexpected by load_weights
                continue
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except Exception as e:
                raise InputError(f"{self.path}: cannot dequantize {tensor.name} ({e})") from None
            weight = torch.from_numpy(np.require(array, np.float32, ["C", "W"]))  # F32 tensors are read-only memmaps
            # llama.cpp's converter interleaves each head's rotary halves in Q and K for Llama; undo it
            if c.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                weight = _unpermute(weight, c.num_attention_heads)
            elif c.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                weight = _unpermute(weight, c.num_key_value_heads)
            yield name, weight


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_TENSOR.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
