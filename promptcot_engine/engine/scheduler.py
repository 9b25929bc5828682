"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Each step is either a prefill step (new or partly prefilled sequences, up to max_num_batched_tokens
tokens, the last one possibly cut into a chunk) or a decode step (one token for every running
sequence). Prefill goes first so new work joins the running batch as soon as it fits. When a decode step
runs out of KV blocks, the most recently admitted sequences are preempted: their blocks are freed and
they go back to the front of the queue to be recomputed later (outputs are unchanged, only time is lost).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from promptcot_engine.engine.block_manager import BlockManager
from promptcot_engine.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed this step for each sequence
    is_prefill: bool
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV copies before the forward


def max_cached_tokens(seq: Sequence) -> int:
    """How many leading tokens may come from the prefix cache: at least one token must be computed to get
    the next-token logits, and a scored continuation needs the hidden state just before its first token."""
    if seq.is_scoring:
        return seq.score_start - 1
    return seq.num_tokens - 1


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # the sequence whose prompt is being prefilled in chunks: it holds blocks, so it always goes first
        self.prefilling: Sequence | None = None
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        seqs, num_new = [], []
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        while budget > 0 and len(self.running) + len(seqs) < self.max_num_seqs:
            if self.prefilling is not None:
                seq, self.prefilling = self.prefilling, None
            elif self.waiting:
                seq = self.waiting[0]
                if not bm.can_allocate(seq, max_cached_tokens(seq)):
                    break
                bm.allocate(seq, max_cached_tokens(seq))
                self.waiting.popleft()
            else:
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            chunk = min(remaining, budget)
            seqs.append(seq)
            num_new.append(chunk)
            budget -= chunk
            if chunk < remaining:
                self.prefilling = seq  # the rest of this prompt goes in the next step's chunk
                break
            seq.status = SequenceStatus.RUNNING
        return ScheduledBatch(seqs, num_new, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch:
        scheduled = []
        bm = self.block_manager
        while self.running:
            seq = self.running.popleft()
            while not bm.append_slot(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                scheduled.append(seq)
        self.running.extend(scheduled)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def admit_prefilled(self, seq: Sequence) -> None:
        """A sequence whose prefill just completed joins the decode set."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
