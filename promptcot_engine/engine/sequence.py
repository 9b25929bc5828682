"""Sequence: one sample being generated or scored, with its tokens, KV block table and stop state."""
from __future__ import annotations

import itertools
from enum import Enum, auto

from promptcot_engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_seq_ids = itertools.count()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: int, index: int = 0,
                 score_start: int | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples this is
        self.params = params
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many the prefix cache supplied
        self.block_table: list[int] = []
        self.num_pending_forks = 0  # n - 1 siblings to fork once the prompt is prefilled
        self.random_key = 0  # this sample's random stream (engine/random_streams.py)
        self.output_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.detokenizer = None  # an IncrementalDetokenizer, for requests with stop strings
        # teacher-forced scoring: log-probs are wanted for positions score_start .. num_prompt_tokens - 1
        self.score_start = score_start
        self.score_logprobs: list[float] = []
        self.score_is_argmax: list[bool] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_scoring(self) -> bool:
        return self.score_start is not None

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def fork(self, index: int) -> "Sequence":
        """A sibling sample sharing everything computed so far (the block manager shares the blocks)."""
        child = Sequence(self.token_ids, self.params, self.request_id, index, self.score_start)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        return child
