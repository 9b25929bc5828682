"""CPU decode attention over contiguous per-sequence rows equals float64 attention over each whole context,
step after step, while sequences join, leave, are refilled, and the rows are moved to new layouts."""
import pytest
import torch

from promptcot_engine.attention.decode_rows import DecodeRows
from promptcot_engine.kernels.kv_cache_store import store_kvcache


class PagedHistory:
    """Sequences with their tokens' K/V kept both in a paged cache (blocks shuffled over a NaN-poisoned pool) and
    as float64 lists: the reference."""

    def __init__(self, layers, num_kv_heads, head_dim, block_size, dtype, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        self.dtype = dtype
        self.shape = (num_kv_heads, head_dim)
        self.caches = [(torch.full((300, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype),
                        torch.full((300, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype))
                       for _ in range(layers)]
        self.free = torch.randperm(300, generator=self.g).tolist()
        self.tables: dict[int, list[int]] = {}
        self.keys: dict[int, list[list[torch.Tensor]]] = {}  # seq -> layer -> [len, kv heads, dim] rows
        self.values: dict[int, list[list[torch.Tensor]]] = {}

    def new_token_kv(self, seq_ids):
        """K/V of one new token per sequence and layer, stored in the paged cache and the reference."""
        per_layer = []
        for layer, (k_cache, v_cache) in enumerate(self.caches):
            k = torch.randn(len(seq_ids), *self.shape, generator=self.g).to(self.dtype)
            v = torch.randn(len(seq_ids), *self.shape, generator=self.g).to(self.dtype)
            slots = []
            for seq_id in seq_ids:
                table = self.tables.setdefault(seq_id, [])
                keys = self.keys.setdefault(seq_id, [[] for _ in self.caches])
                self.values.setdefault(seq_id, [[] for _ in self.caches])
                position = len(keys[layer])
                if position // self.block_size == len(table):
                    table.append(self.free.pop())
                slots.append(table[position // self.block_size] * self.block_size + position % self.block_size)
            store_kvcache(k, v, k_cache, v_cache, torch.tensor(slots))
            for i, seq_id in enumerate(seq_ids):
                self.keys[seq_id][layer].append(k[i].double())
                self.values[seq_id][layer].append(v[i].double())
            per_layer.append((k, v))
        return per_layer

    def block_tables(self, seq_ids):
        """The batch's tables padded as the engine pads them: [B, widest] int32."""
        width = max(len(self.tables[s]) for s in seq_ids)
        return torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids], dtype=torch.int32)

    def prefill(self, seq_id, length):
        for _ in range(length):
            self.new_token_kv([seq_id])

    def reference(self, seq_ids, layer, q, scale):
        outs = []
        for i, seq_id in enumerate(seq_ids):
            keys = torch.stack(self.keys[seq_id][layer])  # [L, nkv, d]
            values = torch.stack(self.values[seq_id][layer])
            group = q.shape[1] // keys.shape[1]
            k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            weights = torch.softmax(torch.einsum("hd,lhd->hl", q[i].double(), k) * scale, -1)
            outs.append(torch.einsum("hl,lhd->hd", weights, v))
        return torch.stack(outs)


def decode_step(rows, history, seq_ids, num_heads, head_dim, tol):
    kv = history.new_token_kv(seq_ids)
    step = rows.plan(seq_ids, [len(history.keys[s][0]) for s in seq_ids], history.block_tables(seq_ids))
    assert step is not None
    scale = head_dim ** -0.5
    for layer, (k, v) in enumerate(kv):
        q = torch.randn(len(seq_ids), num_heads, head_dim, generator=history.g).to(history.dtype)
        got = step.attend(layer, q, k, v, *history.caches[layer], scale)
        assert got.dtype == q.dtype and torch.isfinite(got).all()
        assert (got.double() - history.reference(seq_ids, layer, q, scale)).abs().max().item() < tol
    return step


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 2), (4, 4)])
def test_rows_follow_joins_leaves_and_layout_changes(dtype, tol, num_heads, num_kv_heads):
    head_dim, block_size, layers = 16, 4, 2
    history = PagedHistory(layers, num_kv_heads, head_dim, block_size, dtype)
    rows = DecodeRows(layers, num_kv_heads, head_dim, block_size, dtype, budget_bytes=1 << 26, max_rows=16)
    for seq_id, length in ((0, 5), (1, 70), (2, 1)):
        history.prefill(seq_id, length)
    capacities = []
    batches = [[0, 1, 2]] * 3 + [[0, 2]] * 2 + [[0, 2, 3, 4, 5, 6]] * 3 + [[2, 4, 6]] * 2 + [[6]] + [[1, 2, 6]] * 2
    for step_index, batch in enumerate(batches):
        for seq_id in batch:
            if seq_id not in history.keys:
                history.prefill(seq_id, 3 + 7 * seq_id)
        step = decode_step(rows, history, batch, num_heads, head_dim, tol)
        assert step.num_slots <= 2 * len(batch)  # rows left by finished sequences are not read: compacted
        capacities.append(rows.capacity)
        assert sorted(rows.slot_of) == sorted(batch)  # sequences that left the batch lost their rows
        assert len(set(rows.slot_of.values())) == len(batch)
    # sequence 1 (the longest) left, so the rows shrank; it came back and was refilled from the paged cache
    assert capacities[3] < capacities[0] and capacities[-1] > capacities[9]
    assert rows.slot_of[6] < 2  # moved down from row 5 when it decoded alone
    assert rows.num_rows >= 6


def test_capacity_growth_moves_rows_in_place():
    """Many steps of one batch: the capacity grows step by step within the storage allocated with room to
    spare (the same storage object), and every step still matches the reference."""
    history = PagedHistory(2, 2, 16, 4, torch.float32, seed=1)
    rows = DecodeRows(2, 2, 16, 4, torch.float32, budget_bytes=1 << 26, max_rows=8)
    batch = [0, 1, 2, 3]
    for seq_id in batch:
        history.prefill(seq_id, 10 + seq_id)
    storages = set()
    for _ in range(80):
        decode_step(rows, history, batch, 4, 16, 1e-5)
        storages.add(rows.storage.data_ptr())
    assert rows.capacity >= 90
    assert len(storages) < rows.capacity // rows.capacity_step  # not a fresh allocation at each growth


def test_rows_that_do_not_fit_are_dropped():
    history = PagedHistory(1, 2, 16, 4, torch.float32)
    history.prefill(0, 40)
    history.prefill(1, 3)
    rows = DecodeRows(1, 2, 16, 4, torch.float32, budget_bytes=2 * 2 * 48 * 16 * 4 + 64, max_rows=4)
    history.new_token_kv([1])
    assert rows.plan([1], [4], history.block_tables([1])) is not None  # one short row fits
    history.new_token_kv([0, 1])
    assert rows.plan([0, 1], [41, 5], history.block_tables([0, 1])) is None  # two rows of 64 do not
    assert rows.storage is None and not rows.slot_of


def test_negative_rows_budget_is_an_error_naming_it():
    from promptcot_engine.config import EngineConfig
    from promptcot_engine.errors import InputError

    with pytest.raises(InputError, match="cpu_decode_rows_memory_gb"):
        EngineConfig(model="unused", cpu_decode_rows_memory_gb=-1.0)
