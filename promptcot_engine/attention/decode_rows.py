"""CPU decode attention over contiguous per-sequence copies of the KV cache ("decode rows").

On CPU there is no kernel that reads the paged cache in place: the torch path must gather each sequence's
blocks into one tensor per layer and step, a copy of the whole batch's context each time, and torch's fused
CPU attention then spends most of its time on per-(sequence, head) overhead for a single query row. Here each
decoding sequence owns a row, [num_kv_heads, capacity, head_dim] of K and of V per layer, filled from the
paged cache when it enters decode and extended by its new token at every step; attention is then two
batched matrix products over all rows (the query heads of a kv head as that row's query rows) around an
fp32 softmax, with no copy of the context.

The paged cache stays the source of truth (prefix caching, preemption, scoring and the GPU backends read
it): a sequence that leaves a decode batch (finished, preempted) loses its row, and gets a new one filled
from the cache when it comes back. The rows cost memory beside the cache: they are kept only while they fit
in `budget_bytes` (by default the engine gives the KV pool's own size); past it the caller falls back to
the gathering path.

Precision: fp32 rows give fp32 scores. For bf16/fp16 the scores come out of the product in that dtype (the
product accumulates in fp32, its output is rounded), as in transformers' eager attention; softmax is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptcot_engine.kernels.attention_states import additive_key_mask
from promptcot_engine.kernels.paged_attention import PagedGather

CAPACITY_STEP_TOKENS = 32


@dataclass
class DecodeRowsStep:
    """One decode step's view of the rows, built once and used by every layer."""
    slot_of_seq: torch.Tensor  # [B] int64: the row of each batch sequence
    in_slot_order: bool  # batch sequence i holds row i, and no other row takes part: no reordering
    positions: torch.Tensor  # [B] int64: where the new token goes in its row (context_len - 1)
    fill_slots: torch.Tensor | None  # rows (re)filled from the paged cache at this step
    fill_gather: PagedGather | None  # their blocks
    fill_width: int  # tokens copied into each filled row (the gather's width)
    num_slots: int  # rows [0, num_slots) take part in the products (free ones in between are masked)
    width: int  # keys read per row: the rows' capacity (the longest context rounded up to a capacity step)
    key_mask: torch.Tensor  # [num_slots * num_kv_heads, 1, width] fp32, 0 or -inf
    rows_k: torch.Tensor  # the rows, [layers, slots, kv heads, capacity, head_dim]
    rows_v: torch.Tensor

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, num_heads, head_dim], this step's k and v [B, num_kv_heads, head_dim], already stored in the
        layer's paged cache -> attention over each sequence's whole context, [B, num_heads, head_dim]."""
        rows_k, rows_v = self.rows_k[layer_idx], self.rows_v[layer_idx]
        if self.fill_gather is not None:
            w = self.fill_width
            rows_k[self.fill_slots, :, :w] = self.fill_gather.gather(k_cache)
            rows_v[self.fill_slots, :, :w] = self.fill_gather.gather(v_cache)
        rows_k[self.slot_of_seq, :, self.positions] = k.to(rows_k.dtype)
        rows_v[self.slot_of_seq, :, self.positions] = v.to(rows_v.dtype)

        B, num_heads, head_dim = q.shape
        S, heads, width = self.num_slots, rows_k.shape[1], self.width
        group = num_heads // heads
        grouped_q = q.view(B, heads, group, head_dim).to(rows_k.dtype)
        if not self.in_slot_order:
            grouped_q = grouped_q.new_zeros(S, heads, group, head_dim).index_copy_(0, self.slot_of_seq, grouped_q)
        keys = rows_k[:S, :, :width].view(S * heads, width, head_dim)  # no copy: a row is [heads, capacity, dim]
        values = rows_v[:S, :, :width].view(S * heads, width, head_dim)
        scores = torch.bmm(grouped_q.view(S * heads, group, head_dim), keys.transpose(1, 2)).float()
        weights = torch.softmax(scores.mul_(scale).add_(self.key_mask), dim=-1).to(rows_k.dtype)
        out = torch.bmm(weights, values).view(S, num_heads, head_dim)
        return (out if self.in_slot_order else out[self.slot_of_seq]).to(q.dtype)


class DecodeRows:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 budget_bytes: int, max_rows: int):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.block_size = block_size
        # capacity follows the longest context in steps of this many tokens: each step of it moves every row
        self.capacity_step = -(-CAPACITY_STEP_TOKENS // block_size) * block_size
        self.dtype = dtype
        self.max_elements = budget_bytes // torch.empty((), dtype=dtype).element_size()
        self.max_rows = max_rows
        self.storage: torch.Tensor | None = None  # flat; its head holds the rows in their current layout
        self.num_rows = 0
        self.capacity = 0
        self.slot_of: dict[int, int] = {}  # seq_id -> row

    def elements_for(self, rows: int, capacity: int) -> int:
        layers, heads, dim = self.shape
        return 2 * layers * rows * heads * capacity * dim

    def layout(self, rows: int, capacity: int) -> torch.Tensor:
        """[2 (K, V), layers, rows, kv heads, capacity, head_dim]: a view of the storage's head."""
        layers, heads, dim = self.shape
        return self.storage[:self.elements_for(rows, capacity)].view(2, layers, rows, heads, capacity, dim)

    def release(self) -> None:
        self.storage = None
        self.num_rows = self.capacity = 0
        self.slot_of.clear()

    def plan(self, seq_ids: list[int], context_lens: list[int], block_tables: torch.Tensor) -> DecodeRowsStep | None:
        """Give every sequence of this decode batch a row holding its context up to this step's token
        (context_lens count it; block_tables: the batch's padded tables, [B, max_blocks]). None when the rows
        would not fit in the budget: the rows are dropped and the caller reads the paged cache instead."""
        present = set(seq_ids)
        for seq_id in [s for s in self.slot_of if s not in present]:  # finished, preempted or not scheduled
            del self.slot_of[seq_id]
        free = sorted(set(range(self.num_rows)) - set(self.slot_of.values()))
        # a sequence keeps its row for as long as it stays in the decode batch, so a row is always one token
        # behind: only sequences that just entered decode need theirs filled from the paged cache
        fill = [i for i, seq_id in enumerate(seq_ids) if seq_id not in self.slot_of]
        for i in fill:
            self.slot_of[seq_ids[i]] = free.pop(0) if free else len(self.slot_of)
        if max(self.slot_of.values()) >= 2 * len(seq_ids):
            self._compact(seq_ids)
        slots = [self.slot_of[s] for s in seq_ids]
        num_slots = max(slots) + 1
        bs, step = self.block_size, self.capacity_step
        capacity = -(-max(context_lens) // step) * step
        rows = self.num_rows
        if num_slots > rows:  # half again, so that sequences joining one by one do not move the rows each time
            rows = max(num_slots, min(rows * 3 // 2, self.max_rows))
        if (rows, capacity) != (self.num_rows, self.capacity) and not self._relayout(rows, capacity):
            self.release()
            return None

        lens = torch.zeros(num_slots, dtype=torch.int64)
        lens[slots] = torch.tensor(context_lens, dtype=torch.int64)
        width = self.capacity
        # a free row sees its first key (finite, never read back), so that no softmax row is empty (NaN)
        visible = torch.arange(width)[None, :] < lens.clamp_min(1)[:, None]
        key_mask = additive_key_mask(visible, torch.float32).expand(num_slots, self.shape[1], 1, width)
        key_mask = key_mask.reshape(-1, 1, width)
        fill_slots = fill_gather = None
        fill_width = 0
        if fill:
            fill_lens = [context_lens[i] for i in fill]
            used_blocks = -(-max(fill_lens) // bs)  # whole blocks: within the capacity, a multiple of block_size
            fill_gather = PagedGather.plan(block_tables[fill, :used_blocks], torch.tensor(fill_lens), bs)
            fill_slots = torch.tensor([slots[i] for i in fill])
            fill_width = used_blocks * bs
        rows_k, rows_v = self.layout(self.num_rows, self.capacity)
        return DecodeRowsStep(
            slot_of_seq=torch.tensor(slots), in_slot_order=slots == list(range(num_slots)),
            positions=torch.tensor(context_lens) - 1, fill_slots=fill_slots, fill_gather=fill_gather,
            fill_width=fill_width, num_slots=num_slots, width=width, key_mask=key_mask, rows_k=rows_k, rows_v=rows_v)

    def _compact(self, seq_ids: list[int]) -> None:
        """Move the rows of sequences past the first len(seq_ids) rows into free rows below: the products run
        over every row up to the highest in use, so rows left by finished sequences would otherwise be read
        at every step until the sequences above them finish (the tail of a long generate call)."""
        count = len(seq_ids)
        free = sorted(set(range(count)) - set(self.slot_of.values()))
        moves = [(self.slot_of[s], free.pop(0)) for s in seq_ids if self.slot_of[s] >= count]
        rows = self.layout(self.num_rows, self.capacity)
        rows[:, :, [new for _, new in moves]] = rows[:, :, [old for old, _ in moves]]
        inverse = {old: new for old, new in moves}
        for seq_id in seq_ids:
            self.slot_of[seq_id] = inverse.get(self.slot_of[seq_id], self.slot_of[seq_id])

    def _relayout(self, rows: int, capacity: int) -> bool:
        """Lay the rows out as `rows` rows of exactly `capacity` tokens (the products read whole rows: a
        narrower view is a strided operand, several times slower in bf16), keeping what they hold. False when
        that does not fit in the budget.

        The storage is allocated uninitialized with room to spare (virtual memory: a page costs its fault only
        when a layout reaches it), and the rows are moved within it one (K or V, layer) chunk at a time
        through a copy of that chunk: a fresh allocation at every step of capacity would pay the page faults
        of all the rows again. Chunks move towards the end when they grow, so the move runs from the last
        chunk down (from the first up when they shrink): a chunk's new place then overlaps only its own old
        place and those of chunks already moved. Whatever a chunk did not hold before is zeroed: what lies past
        a row's length must be finite (a zero softmax weight times NaN is NaN)."""
        need = self.elements_for(rows, capacity)
        if need > self.max_elements:
            return False
        old = self.layout(self.num_rows, self.capacity) if self.storage is not None else None
        in_place = old is not None and need <= self.storage.numel()
        if not in_place:
            self.storage = torch.empty(min(4 * need, self.max_elements), dtype=self.dtype)
        kept_rows, kept = min(rows, self.num_rows), min(capacity, self.capacity)
        new = self.layout(rows, capacity)
        chunks = [(kv, layer) for kv in range(2) for layer in range(self.shape[0])]
        if in_place and rows * capacity > self.num_rows * self.capacity:
            chunks.reverse()
        for kv, layer in chunks:
            chunk = new[kv, layer]
            if old is not None:
                held = old[kv, layer, :kept_rows, :, :kept]
                chunk[:kept_rows, :, :kept] = held.clone() if in_place else held
            chunk[:kept_rows, :, kept:] = 0
            chunk[kept_rows:] = 0
        self.num_rows, self.capacity = rows, capacity
        return True
