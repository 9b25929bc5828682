"""EMConfig: every setting of an EM run, from defaults, a TOML file and command-line flags (in that order).

Defaults follow the paper where it gives a number (K = 8, E/M learning rate 2e-6, cold start 2e-5 for 2
epochs, batch 16, synthesis at temperature 0.8 and top-p 1.0 with up to 4,096 new tokens); the number of
EM iterations, which the paper leaves at "until convergence", is a setting.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from promptcot_engine.errors import InputError


@dataclass
class EMConfig:
    model: str = "smollm2-135m-instruct"  # the initial checkpoint of both q and p
    teacher: str | None = None  # cold-start annotator; None: the same checkpoint as `model`
    seeds: str = "champ"  # "champ" or a JSONL of seed problems
    num_seeds: int | None = None
    k: int = 8  # rationales sampled per (c, x) in the E-step
    iterations: int = 1
    num_problems: int = 1000  # concept sets sent to the prompt model in synthesis (before filtering)
    max_tokens: int = 1024  # new tokens for teacher answers and for E-step / M-step rationales
    synthesis_max_tokens: int = 4096
    synthesis_temperature: float = 0.8
    synthesis_top_p: float = 1.0
    estep_temperature: float = 1.0
    num_concepts: int = 5
    default_level: str = "AIME"  # when neither the seed nor the teacher gives a usable level
    length_normalize: bool = False  # reward per token instead of the plain sum (off, as in the paper)
    cold_start_lr: float = 2e-5
    cold_start_epochs: int = 2
    em_lr: float = 2e-6
    em_epochs: int = 1
    batch_size: int = 16
    max_length: int = 2048  # training tokens per example
    warmup: float = 0.0
    train_bf16: bool | None = None  # bf16 autocast in SFT; None: on CUDA only (True pays off on CPUs with AVX512-BF16)
    keep_checkpoints: int = 2  # iterations whose q and p checkpoints are kept (the cold start's too)
    chunk_size: int = 64  # records per durable output part: a kill loses at most one part's work
    run_dir: str = "runs/em"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_gb: float | None = None
    # each engine's share of a GPU (weights, activations, KV cache): q's and p's engines live side by side
    # with their trainers, so neither may take the 0.9 a lone engine does
    gpu_memory_utilization: float = 0.3
    max_num_seqs: int = 256

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise InputError(f"EMConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("k", "iterations", "num_problems", "max_tokens", "synthesis_max_tokens", "num_concepts",
                     "cold_start_epochs", "em_epochs", "batch_size", "max_length", "chunk_size", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "a positive integer")
        if self.num_seeds is not None and (not isinstance(self.num_seeds, int) or self.num_seeds < 1):
            bad("num_seeds", "a positive integer or unset")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            bad("keep_checkpoints", "a positive integer")
        for name in ("cold_start_lr", "em_lr", "synthesis_temperature", "estep_temperature", "warmup"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                bad(name, "a number >= 0")
        for name in ("synthesis_top_p", "gpu_memory_utilization"):
            if not isinstance(getattr(self, name), (int, float)) or not 0 < getattr(self, name) <= 1:
                bad(name, "in (0, 1]")

    def make_llm(self, model: str):
        """An inference engine for `model` with this run's engine settings."""
        from promptcot_engine.engine.llm import LLM

        return LLM(model, dtype=self.dtype, device=self.device, seed=self.seed, max_num_seqs=self.max_num_seqs,
                   kv_cache_memory_gb=self.kv_cache_gb, gpu_memory_utilization=self.gpu_memory_utilization)

    @property
    def teacher_model(self) -> str:
        return self.teacher or self.model

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides) -> "EMConfig":
        """Defaults, then the TOML file's keys, then the overrides that are not None."""
        values: dict = {}
        if toml_path is not None:
            path = Path(toml_path)
            if not path.is_file():
                raise InputError(f"{path}: no such file")
            try:
                values = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise InputError(f"{path}: invalid TOML ({e})") from None
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise InputError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
