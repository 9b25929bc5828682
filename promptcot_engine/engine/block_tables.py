"""The block tables of the sequences being run, kept as rows of one int32 array from step to step.

A decode step changes a sequence's block table by at most one block (a new one every block_size tokens),
yet building the step's [sequences, blocks] tensor from Python lists costs time in proportion to the whole
context: 3.6 ms for 256 sequences of 256 blocks, host time that a GPU waits through. Here a sequence keeps
one row from its first step to its end; a step copies in only the blocks appended since, and the step's
tables and slot mapping are numpy gathers over the rows (the role of vLLM's worker-side BlockTable).
"""
from __future__ import annotations

import numpy as np

from promptcot_engine.engine.sequence import Sequence


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, capacity: int = 64):
        self.table = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = [0] * capacity  # blocks written into each row (a list: read per sequence per step)
        # the list each row was copied from: the block manager appends to a sequence's list in place and gives
        # it a new list when the table starts over (allocation after preemption, a fork), so a row whose
        # source is not the sequence's current list is rewritten from the start
        self.sources: list[list[int] | None] = [None] * capacity
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(capacity - 1, -1, -1))

    def rows(self, seqs: list[Sequence]) -> np.ndarray:
        """Each sequence's row [len(seqs)] int64, brought up to date with its block table."""
        rows = []
        row_of, sources, num_blocks = self.row_of, self.sources, self.num_blocks
        for seq in seqs:
            row = row_of.get(seq.seq_id)
            if row is None:
                row = self._take_row(seq.seq_id)
            blocks = seq.block_table
            if sources[row] is not blocks:
                self._clear(row)
                sources[row] = blocks
            written = num_blocks[row]
            if written < len(blocks):
                self.table[row, written:len(blocks)] = blocks[written:]
                num_blocks[row] = len(blocks)
            rows.append(row)
        return np.array(rows, dtype=np.int64)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows' tables [len(rows), their longest table], padded with block 0 (never read: past a
        sequence's context)."""
        num_blocks = self.num_blocks
        width = max(num_blocks[row] for row in rows.tolist())
        return self.table[rows, :width]

    def slots(self, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
        """The cache slot of the token at positions[i] of the sequence in rows[i], int64."""
        blocks = self.table[rows, positions // block_size].astype(np.int64)
        return blocks * block_size + positions % block_size

    def release(self, seq_id: int) -> None:
        """The sequence is finished: its row is free for another."""
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self._clear(row)
            self.sources[row] = None
            self.free_rows.append(row)

    def _clear(self, row: int) -> None:
        self.table[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0

    def _take_row(self, seq_id: int) -> int:
        if not self.free_rows:
            capacity = len(self.sources)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.num_blocks += [0] * capacity
            self.sources += [None] * capacity
            self.free_rows = list(range(2 * capacity - 1, capacity - 1, -1))
        row = self.free_rows.pop()
        self.row_of[seq_id] = row
        return row
