"""What LLM.generate and LLM.score return (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, None for EOS/length


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


@dataclass
class ScoreOutput:
    token_ids: list[int]  # the continuation's tokens (all segments, concatenated)
    token_logprobs: list[float]  # log p(token | everything before it), fp32 math
    logprob_sum: float
    is_greedy: bool  # argmax == target at every continuation token
    segment_logprob_sums: list[float] | None = None  # one sum per segment when the continuation came as segments
    segment_lengths: list[int] | None = None
