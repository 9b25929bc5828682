"""ModelConfig: the decoder's hyper-parameters, read from an HF config.json (transformers 4.x or 5.x)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from promptcot_engine.errors import InputError

# architecture name -> model_type, as transformers writes them
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    # the config.json this came from, written back unchanged (apart from dtype) when a checkpoint is saved
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise InputError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        architectures = d.get("architectures") or []
        if not architectures:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if d.get("model_type") not in by_type:
                raise InputError(
                    f"{source}: unsupported architecture (model_type {d.get('model_type')!r}); "
                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            architectures = [by_type[d["model_type"]]]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"{source}: unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden_size = int(d["hidden_size"])
            num_heads = int(d["num_attention_heads"])
            rope_theta, rope_scaling = _read_rope(d)
            eos = d.get("eos_token_id")
            model_type = SUPPORTED_ARCHITECTURES[architecture]
            return cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                rope_scaling=rope_scaling,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                hf_config=d,
            )
        except KeyError as e:
            raise InputError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise InputError(f"{source}: {e}") from None
            raise InputError(f"{source}: malformed field ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        """config.json contents that transformers (4.x and 5.x) and this engine both load."""
        d = dict(self.hf_config) if self.hf_config else self._fresh_hf_dict()
        if dtype is not None:
            d.pop("dtype", None)
            d["torch_dtype"] = dtype
        return d

    def _fresh_hf_dict(self) -> dict:
        d = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids or None,
            "torch_dtype": self.torch_dtype or "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen3":
            d["attention_bias"] = self.qkv_bias
        return d

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("hf_config")
        return d


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from transformers 4.x (top-level rope_theta + rope_scaling) or 5.x (rope_parameters)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        scaling = dict(d.get("rope_scaling") or {})
        params = d
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling
