"""Paged attention against a float64 reference built by a plain loop over sequences, heads and cached
positions: the Triton decode kernel (under TRITON_INTERPRET=1, into a NaN-poisoned output), the batched
torch decode path, and the torch prefill path with a cached prefix."""
import math
import os

import pytest
import torch

from promptcot_engine.kernels.kv_cache_store import store_kvcache_torch
from promptcot_engine.kernels.paged_attention import (
    PagedGather,
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    paged_prefill_attention_torch,
)

# a GPU run turns the interpreter off (TRITON_INTERPRET=0): the Triton kernel then runs compiled, on CUDA
KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
PADDING = 2**30  # block-table entries past a sequence's last block: out of range, so never to be read


def make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed, spare_blocks=3):
    """Random caches whose blocks are handed out in shuffled order, so no sequence's blocks are contiguous,
    plus spare blocks owned by nobody; block tables padded with an invalid block id."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(max(blocks_per_seq), 1) + 1
    block_tables = torch.full((len(context_lens), width), PADDING, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    # what no sequence owns is NaN (spare blocks, the tail of each last block): it must never be read
    for cache in (k_cache, v_cache):
        cache[order] = float("nan")
        for b, n in enumerate(context_lens):
            if n % block_size:
                cache[block_tables[b, n // block_size], n % block_size:] = float("nan")
    return k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


def make_queries(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed):
    """Queries as a slice of one fused q/k/v projection output, as the model hands them over (strided rows)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    return qkv[:, :num_heads]


def decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, block_n):
    """The Triton kernel on the kernel's device, into a NaN-poisoned output buffer; the result on the CPU."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=KERNEL_DEVICE)
    on_device = (t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, block_tables, context_lens))
    got = paged_decode_attention_triton(*on_device, scale, out, block_n=block_n)
    assert got is out and got.dtype == q.dtype
    return got.cpu()


def naive_attention_float64(q_rows, q_positions, k_cache, v_cache, block_table, scale):
    """One sequence: each query row attends to cache positions 0..its position, read block by block."""
    num_heads = q_rows.shape[1]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.zeros(q_rows.shape, dtype=torch.float64)
    for i, pos in enumerate(q_positions):
        slots = [(int(block_table[p // block_size]), p % block_size) for p in range(pos + 1)]
        for h in range(num_heads):
            kv_head = h // (num_heads // num_kv_heads)
            keys = torch.stack([k_cache[blk, off, kv_head] for blk, off in slots]).double()
            values = torch.stack([v_cache[blk, off, kv_head] for blk, off in slots]).double()
            weights = torch.softmax(keys @ q_rows[i, h].double() * scale, dim=0)
            out[i, h] = weights @ values
    return out


def naive_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.cat([naive_attention_float64(q[b:b + 1], [int(n) - 1], k_cache, v_cache, block_tables[b], scale)
                      for b, n in enumerate(context_lens)])


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


DECODE_CASES = [
    # block_size, block_n (kernel tile), num_heads, num_kv_heads, head_dim, dtype, context_lens
    (16, 16, 9, 3, 64, torch.float32, [1, 17, 40]),        # SmolLM2's heads, 3:1
    (32, 16, 7, 1, 128, torch.bfloat16, [33, 5]),          # 7:1, tiles smaller than blocks
    (16, 32, 14, 2, 128, torch.float32, [16, 47, 2]),      # 7:1, tiles spanning two blocks
    (32, 32, 9, 3, 64, torch.bfloat16, [64, 31, 1]),
    (5, 16, 6, 2, 24, torch.float32, [12, 3]),             # odd block size and head_dim
]


@pytest.mark.parametrize("block_size,block_n,num_heads,num_kv_heads,head_dim,dtype,context_lens", DECODE_CASES)
def test_decode_triton_and_torch_match_naive(block_size, block_n, num_heads, num_kv_heads, head_dim, dtype,
                                             context_lens):
    seed = block_size + head_dim + num_heads
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = make_queries(len(context_lens), num_heads, num_kv_heads, head_dim, dtype, seed + 1)
    scale = head_dim ** -0.5
    want = naive_decode(q, k_cache, v_cache, block_tables, ctx, scale)

    got_triton = decode_triton(q, k_cache, v_cache, block_tables, ctx, scale, block_n)
    torch.testing.assert_close(got_triton.double(), want, **tolerance(dtype))

    got_torch = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, ctx, scale)
    assert got_torch.dtype == dtype
    torch.testing.assert_close(got_torch.double(), want, **tolerance(dtype))


def test_decode_torch_path_is_exact_in_float64():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([9, 1, 30], 8, 2, 16, torch.float64, seed=5)
    q = make_queries(3, 6, 2, 16, torch.float64, seed=6)
    want = naive_decode(q, k_cache, v_cache, block_tables, ctx, 0.3)
    torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.3), want,
                               rtol=1e-12, atol=1e-12)


def test_decode_torch_path_with_a_gather_plan_reused_across_layers():
    """The engine builds the gather plan once per step and every layer reads its own cache with it."""
    k_cache, v_cache, block_tables, ctx = make_paged_cache([9, 1, 30], 8, 2, 16, torch.float64, seed=7)
    plan = PagedGather.plan(block_tables, ctx, 8)
    q = make_queries(3, 6, 2, 16, torch.float64, seed=9)
    # two "layers": the same tables over their own caches (unowned slots stay NaN in both)
    for layer_k, layer_v in ((k_cache, v_cache), (k_cache * -0.5, v_cache + 1.0)):
        want = naive_decode(q, layer_k, layer_v, block_tables, ctx, 0.3)
        got = paged_decode_attention_torch(q, layer_k, layer_v, block_tables, ctx, 0.3, plan)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_empty_context_gives_zeros_without_disturbing_other_rows():
    k_cache, v_cache, block_tables, _ = make_paged_cache([10, 4], 4, 1, 16, torch.float32, seed=7)
    ctx = torch.tensor([10, 0], dtype=torch.int32)  # row 1 as a CUDA-graph padding row
    q = make_queries(2, 2, 1, 16, torch.float32, seed=8)
    want_row0 = naive_decode(q[:1], k_cache, v_cache, block_tables[:1], ctx[:1], 0.25)
    for got in (decode_triton(q, k_cache, v_cache, block_tables, ctx, 0.25, block_n=16),
                paged_decode_attention_torch(q, k_cache, v_cache, block_tables, ctx, 0.25)):
        torch.testing.assert_close(got[:1].double(), want_row0, rtol=1e-5, atol=1e-5)
        assert not got[1].any()


def test_decode_with_keys_written_by_store_kvcache():
    """The two kernels agree on the layout: tokens stored through slot_mapping are the ones attended to."""
    block_size, nkv, d = 4, 2, 16
    k_cache, v_cache, block_tables, ctx = make_paged_cache([6, 9], block_size, nkv, d, torch.float32, seed=9)
    k_cache.fill_(float("nan"))  # only stored positions may be read
    v_cache.fill_(float("nan"))
    g = torch.Generator().manual_seed(10)
    keys, values = torch.randn(15, nkv, d, generator=g), torch.randn(15, nkv, d, generator=g)
    slots = [int(block_tables[b, p // block_size]) * block_size + p % block_size
             for b, n in enumerate([6, 9]) for p in range(n)]
    store_kvcache_torch(keys, values, k_cache, v_cache, torch.tensor(slots))
    q = make_queries(2, 4, nkv, d, torch.float32, seed=11)
    # direct attention over the stored tokens, sequence by sequence
    want = []
    for b, (lo, hi) in enumerate([(0, 6), (6, 15)]):
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys[lo:hi].double().repeat_interleave(2, dim=1)) * d ** -0.5
        want.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values[lo:hi].double().repeat_interleave(2, dim=1)))
    want = torch.stack(want)
    got = decode_triton(q, k_cache, v_cache, block_tables, ctx, d ** -0.5, block_n=16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_decode_attention_torch(q, k_cache, v_cache, block_tables, ctx, d ** -0.5).double(),
                               want, rtol=1e-5, atol=1e-5)


PREFILL_CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype, cached prefix lengths, new token counts
    (4, 9, 3, 16, torch.float64, [0, 5, 8], [3, 1, 6]),
    (16, 7, 1, 64, torch.float32, [19, 0, 32], [7, 5, 1]),
    (16, 6, 2, 24, torch.bfloat16, [3, 17], [13, 2]),
    (8, 4, 4, 32, torch.float32, [0, 0], [5, 3]),  # nothing cached yet: the causal part alone
]


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype,prefix_lens,q_lens", PREFILL_CASES)
def test_prefill_torch_path_matches_naive(block_size, num_heads, num_kv_heads, head_dim, dtype, prefix_lens, q_lens):
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    seed = block_size + head_dim
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = make_queries(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, seed + 1)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = head_dim ** -0.5
    got = paged_prefill_attention_torch(q, cu_seqlens_q, k_cache, v_cache, block_tables, ctx, scale)
    assert got.shape == q.shape and got.dtype == dtype
    want = torch.cat([
        naive_attention_float64(q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]], list(range(prefix_lens[b], context_lens[b])),
                                k_cache, v_cache, block_tables[b], scale)
        for b in range(len(q_lens))])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else tolerance(dtype)
    torch.testing.assert_close(got.double(), want, **tol)


def test_prefill_of_one_token_per_sequence_equals_decode():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([7, 20, 1], 8, 3, 32, torch.float32, seed=12)
    q = make_queries(3, 9, 3, 32, torch.float32, seed=13)
    prefill = paged_prefill_attention_torch(q, torch.arange(4, dtype=torch.int32), k_cache, v_cache, block_tables, ctx, 0.2)
    decode = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, ctx, 0.2)
    torch.testing.assert_close(prefill, decode, rtol=1e-5, atol=1e-6)


def test_dispatch_rejects_head_counts_that_do_not_group():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([3], 4, 2, 16, torch.float32, seed=14)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 5, 16), k_cache, v_cache, block_tables, ctx, 0.25)
