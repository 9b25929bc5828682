"""A hypothesis state machine drives the BlockManager through allocations, prefix hits, appends, forks,
preemptions and frees: no block leaks, no reference count goes negative, the prefix cache only maps to
matching blocks, and everything is free at the end. The model runner's persistent BlockTables follow along:
whatever steps run, in whatever order, they give each step exactly the sequences' current tables and slots."""
import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from promptcot_engine.engine.block_manager import BlockManager
from promptcot_engine.engine.block_tables import BlockTables
from promptcot_engine.engine.sequence import Sequence
from promptcot_engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
PARAMS = SamplingParams(max_tokens=64)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=24, block_size=BLOCK_SIZE)
        self.live: list[Sequence] = []
        self.tables = BlockTables(max_blocks_per_seq=64 // BLOCK_SIZE + 1, capacity=2)  # small: it must grow

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=30))
    def allocate(self, tokens):
        seq = Sequence(tokens, PARAMS, request_id=0)
        limit = seq.num_tokens - 1
        if self.bm.can_allocate(seq, limit):
            self.bm.allocate(seq, limit)
            assert seq.num_cached_tokens <= limit
            for i in range(seq.num_cached_tokens // BLOCK_SIZE):  # a hit holds exactly these tokens' KV
                assert self.bm.blocks[seq.block_table[i]].token_ids == tuple(seq.block_tokens(i, BLOCK_SIZE))
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute_all(self, data):
        seq = data.draw(st.sampled_from(self.live))
        seq.num_computed_tokens = seq.num_tokens
        self.bm.mark_computed(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_computed_tokens < seq.num_tokens:
            return
        seq.token_ids.append(token)
        table_before = list(seq.block_table)
        if self.bm.append_slot(seq):
            assert len(seq.block_table) == seq.num_blocks(BLOCK_SIZE)
        else:  # refused only for want of a free block, and then nothing changed
            assert self.bm.num_free_blocks == 0 and seq.block_table == table_before
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        if parent.num_computed_tokens < parent.num_tokens or not self.bm.can_fork(parent, 1):
            return
        child = parent.fork(1)
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.deallocate(seq)
        self.tables.release(seq.seq_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt_and_readmit(self, data):
        """Recompute preemption: the blocks go back, the sequence keeps its row and is allocated again later."""
        seq = data.draw(st.sampled_from(self.live))
        self.bm.deallocate(seq)
        limit = seq.num_tokens - 1
        if self.bm.can_allocate(seq, limit):
            self.bm.allocate(seq, limit)
        else:
            self.live.remove(seq)
            self.tables.release(seq.seq_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data):
        """A step over some of the live sequences, in any order: their gathered tables and slots."""
        seqs = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=len(self.live), unique=True))
        rows = self.tables.rows(seqs)
        tables = self.tables.gather(rows)
        width = max(len(s.block_table) for s in seqs)
        assert tables.tolist() == [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        positions = np.array([data.draw(st.integers(0, s.num_tokens - 1)) for s in seqs])
        expected = [s.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for s, p in zip(seqs, positions)]
        assert self.tables.slots(rows, positions, BLOCK_SIZE).tolist() == expected

    @invariant()
    def reference_counts_match_block_tables(self):
        expected = [0] * self.bm.num_blocks
        for seq in self.live:
            assert len(seq.block_table) == seq.num_blocks(BLOCK_SIZE)
            for block_id in seq.block_table:
                expected[block_id] += 1
        assert [b.ref_count for b in self.bm.blocks] == expected
        assert set(self.bm.free_block_ids) == {i for i, n in enumerate(expected) if n == 0}

    @invariant()
    def prefix_cache_maps_to_matching_blocks(self):
        for h, block_id in self.bm.hash_to_block_id.items():
            block = self.bm.blocks[block_id]
            assert block.hash == h and len(block.token_ids) == BLOCK_SIZE

    @invariant()
    def block_table_rows_are_distinct(self):
        assert len(set(self.tables.row_of.values())) == len(self.tables.row_of)
        assert set(self.tables.row_of) <= {s.seq_id for s in self.live}

    def teardown(self):
        for seq in self.live:
            self.bm.deallocate(seq)
            self.tables.release(seq.seq_id)
        assert not self.tables.row_of and not any(self.tables.num_blocks) and not self.tables.table.any()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
