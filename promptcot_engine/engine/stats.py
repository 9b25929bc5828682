"""Counters of what the engine did, for progress bars and benchmarks (e.g. the decode bandwidth roofline)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_context_tokens: int = 0  # KV entries read by decode steps (sum of the context lengths)
