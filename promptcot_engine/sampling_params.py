"""SamplingParams: how one request is decoded (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) keeps the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None  # a seeded request gives the same tokens whatever else shares the batch
    max_tokens: int = 256
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # log-prob of each sampled token under the model's unmodified distribution
    skip_special_tokens: bool = True
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._check()

    def _check(self) -> None:
        from promptcot_engine.errors import InputError

        def bad(name: str, rule: str):
            raise InputError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "-1 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", "an integer in [0, max_tokens]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
