"""EngineConfig: the engine's settings, validated at construction (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from promptcot_engine.errors import InputError

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash")


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int | None = None  # None: 256 with flash-attn (its paged layout wants it), else 16
    kv_cache_memory_gb: float | None = None  # None: profiled free memory on GPU, a share of RAM on CPU
    num_kv_blocks: int | None = None  # overrides the budget: exactly this many KV blocks (tests, tuning)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True disables CUDA graphs for decode
    attention_backend: str = "auto"
    # on CPU, the C kernels where built (decode attention, RMSNorm, rotary, the sampler's draw: csrc/cpu/) in
    # place of torch ops; False: torch ops throughout (the references; the KV store's exact C copy stays)
    cpu_kernels: bool = True

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise InputError(f"EngineConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and not isinstance(value, int):
                bad(f.name, "an integer")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", ">= 1")
        if self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", ">= 1")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            bad("block_size", "a positive integer")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            bad("kv_cache_memory_gb", "> 0")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            bad("num_kv_blocks", "a positive integer")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "in (0, 1]")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            bad("max_model_len", "a positive integer")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"one of {', '.join(ATTENTION_BACKENDS)}")
