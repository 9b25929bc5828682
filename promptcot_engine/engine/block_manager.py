"""BlockManager: the paged KV cache's block pool, block tables and prefix cache.

A block holds the KV of `block_size` consecutive tokens. Blocks are reference counted so samples of one
request and requests with a common prefix share them. A full block whose KV has been computed is
registered under a hash of (previous block's hash, its token ids), for prompt and generated tokens alike;
a later sequence starting with the same tokens reuses it instead of recomputing. Blocks whose count drops to
zero go to the back of an LRU free list but keep their hash, so they can still be hit until reused.

Only computed blocks are registered: a sequence admitted while another is still prefilling the same prefix
(possibly over several chunked steps) never reads KV that has not been written yet.
"""
from __future__ import annotations

from collections import OrderedDict

from promptcot_engine.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(token_ids: tuple[int, ...], prefix_hash: int | None) -> int:
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.hash_to_block_id: dict[int, int] = {}
        self.seq_block_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its computed full blocks
        self.num_prefix_hit_tokens = 0
        self.num_prefix_queried_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # evicted from the prefix cache
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def _find_cached(self, seq: Sequence, max_cached_tokens: int) -> list[tuple[int, int]]:
        """(block_id, hash) for the longest run of registered blocks matching the sequence's first tokens."""
        hits, prefix = [], None
        if not self.enable_prefix_caching:
            return hits
        bs = self.block_size
        for i in range(max_cached_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prefix = block_hash(tokens, prefix)
            block_id = self.hash_to_block_id.get(prefix)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append((block_id, prefix))
        return hits

    def can_allocate(self, seq: Sequence, max_cached_tokens: int) -> bool:
        hits = self._find_cached(seq, max_cached_tokens)
        in_use_hits = sum(1 for block_id, _ in hits if self.blocks[block_id].ref_count > 0)
        return seq.num_blocks(self.block_size) - in_use_hits <= self.num_free_blocks

    def allocate(self, seq: Sequence, max_cached_tokens: int) -> None:
        """Give `seq` blocks for all its tokens, reusing cached ones for at most `max_cached_tokens` leading
        tokens (the caller keeps the tokens whose hidden states it needs out of that range)."""
        assert not seq.block_table
        hits = self._find_cached(seq, max_cached_tokens)
        for block_id, _ in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(len(hits), seq.num_blocks(self.block_size)):
            seq.block_table.append(self._take_free_block().block_id)
        self.seq_block_hashes[seq.seq_id] = [h for _, h in hits]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.num_prefix_hit_tokens += seq.num_cached_tokens
        self.num_prefix_queried_tokens += seq.num_tokens

    def mark_computed(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_block_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(tokens, hashes[-1] if hashes else None)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block_id and block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id[h] = block.block_id

    def append_slot(self, seq: Sequence) -> bool:
        """Make room for the sequence's newest token: a new block when it starts one. False, changing nothing,
        when that needs a block and none is free."""
        if len(seq.block_table) * self.block_size >= len(seq.token_ids):
            return True
        if not self.free_block_ids:
            return False
        seq.block_table.append(self._take_free_block().block_id)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's blocks with a new sibling sample. A partly filled last block will be written
        by both, so the child gets its own copy: returns (src, dst) for the KV copy, or None."""
        full = parent.num_tokens // self.block_size
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:full]
        self.seq_block_hashes[child.seq_id] = list(self.seq_block_hashes.get(parent.seq_id, []))
        if len(parent.block_table) > full:
            copy = self._take_free_block().block_id
            child.block_table.append(copy)
            return parent.block_table[full], copy
        return None

    def can_fork(self, parent: Sequence, num_children: int) -> bool:
        partial = len(parent.block_table) > parent.num_tokens // self.block_size
        return not partial or self.num_free_blocks >= num_children

    def deallocate(self, seq: Sequence) -> None:
        # tail blocks first, so the shareable prefix blocks are the last to be evicted
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.seq_block_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the weights changed, so their KV is stale)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block_id.clear()
        for hashes in self.seq_block_hashes.values():
            hashes.clear()
