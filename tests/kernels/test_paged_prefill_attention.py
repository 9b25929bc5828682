"""The Triton paged prefill-attention kernel (kernels/paged_prefill_attention.py) under TRITON_INTERPRET=1,
always into a NaN-poisoned output buffer, against the float64 per-sequence loop of test_paged_attention.py and
against `paged_prefill_attention_torch`, whose contract it takes over (its GPU compiles: test_gpu_launch.py).

The grids stay small (a few dozen programs per call; the interpreter costs milliseconds a program), with
tiles of 16 so that a few tokens already span several query tiles and key tiles."""
import pytest
import torch

from promptcot_engine.kernels.paged_attention import paged_decode_attention_triton, paged_prefill_attention_torch
from promptcot_engine.kernels.paged_prefill_attention import paged_prefill_attention_triton
from tests.kernels.test_paged_attention import (
    KERNEL_DEVICE,
    make_paged_cache,
    make_queries,
    naive_attention_float64,
    tolerance,
)


def cu_seqlens(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def prefill_triton(q, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale, max_seqlen_q, block_m=16,
                   block_n=16):
    """The kernel on the kernel's device into a NaN-poisoned output buffer: every row it owes must be written."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=KERNEL_DEVICE)
    on_device = (t.to(KERNEL_DEVICE) for t in (q, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens))
    got = paged_prefill_attention_triton(*on_device, scale, max_seqlen_q, out, block_m=block_m, block_n=block_n)
    assert got is out and got.dtype == q.dtype
    got = got.cpu()
    assert not got.isnan().any()
    return got


def naive_prefill(q, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale):
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    return torch.cat([
        naive_attention_float64(q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]], list(range(int(n) - q_lens[b], int(n))),
                                k_cache, v_cache, block_tables[b], scale)
        for b, n in enumerate(context_lens)])


def make_prefill(block_size, num_heads, num_kv_heads, head_dim, dtype, prefix_lens, q_lens, seed):
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype,
                                                           seed)
    q = make_queries(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, seed + 1)
    return q, cu_seqlens(q_lens), k_cache, v_cache, block_tables, ctx


CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype, cached prefix lengths, new token counts, block_m, block_n
    # SmolLM2's 9:3, one slot per block; odd T; a sequence with a cached context and no new token
    (1, 9, 3, 64, torch.float32, [0, 5, 9, 2], [3, 4, 0, 2], 16, 16),
    # 7 tokens x 3 heads = 21 rows: a second query tile that starts inside a token's group; blocks of 3
    (3, 9, 3, 40, torch.bfloat16, [4, 0, 17], [7, 5, 1], 16, 16),
    # no GQA, head_dim 80 padded to 128; 33 keys = three key tiles; a padding sequence (no context, no token)
    (16, 4, 4, 80, torch.float32, [0, 21, 0], [5, 12, 0], 16, 16),
    # 8:1: two tokens a query tile, three tiles for the longest sequence and an idle one for the other
    (3, 8, 1, 64, torch.bfloat16, [11, 0], [3, 6], 16, 16),
    # the wrapper's default query tile (64 rows), key tiles over two blocks of 16
    (16, 8, 1, 40, torch.float32, [30, 2, 0], [4, 1, 7], 64, 32),
]


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype,prefix_lens,q_lens,block_m,block_n", CASES)
def test_prefill_triton_matches_naive_and_torch(block_size, num_heads, num_kv_heads, head_dim, dtype, prefix_lens,
                                               q_lens, block_m, block_n):
    q, cu, k_cache, v_cache, block_tables, ctx = make_prefill(block_size, num_heads, num_kv_heads, head_dim, dtype,
                                                              prefix_lens, q_lens, seed=block_size + head_dim)
    assert q.stride(0) != num_heads * head_dim  # strided rows, as sliced out of a fused q/k/v projection
    scale = head_dim ** -0.5
    got = prefill_triton(q, cu, k_cache, v_cache, block_tables, ctx, scale, max(q_lens), block_m, block_n)
    want = naive_prefill(q, cu, k_cache, v_cache, block_tables, ctx, scale)
    torch.testing.assert_close(got.double(), want, **tolerance(dtype))
    torch_path = paged_prefill_attention_torch(q, cu, k_cache, v_cache, block_tables, ctx, scale)
    torch.testing.assert_close(got, torch_path, **tolerance(dtype))


def test_block_table_padding_pointing_at_nan_blocks():
    """Padding entries of the tables that hold a real block id (one full of NaN) rather than an out-of-range
    one: any read of them, or of the unowned tail of a last block, would turn up as NaN."""
    q_lens, prefix_lens = [2, 5], [9, 0]
    q, cu, k_cache, v_cache, block_tables, ctx = make_prefill(4, 6, 2, 16, torch.float32, prefix_lens, q_lens, seed=3)
    owned = {int(b) for b, n in zip(block_tables, ctx) for b in b[:(int(n) + 3) // 4]}
    spare = [b for b in range(k_cache.shape[0]) if b not in owned]
    assert spare and k_cache[spare].isnan().all()
    for b, n in enumerate(ctx.tolist()):
        block_tables[b, (n + 3) // 4:] = spare[b % len(spare)]
    got = prefill_triton(q, cu, k_cache, v_cache, block_tables, ctx, 0.25, max(q_lens))
    torch.testing.assert_close(got.double(), naive_prefill(q, cu, k_cache, v_cache, block_tables, ctx, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_peaked_softmax_over_many_key_tiles():
    """A large scale makes each row's softmax peak on a few keys, whose maximum moves from key tile to key tile
    (eight tiles of 16): an online softmax that does not rescale what it summed under an older maximum fails."""
    q, cu, k_cache, v_cache, block_tables, ctx = make_prefill(16, 2, 1, 16, torch.float32, [120], [5], seed=4)
    got = prefill_triton(q, cu, k_cache, v_cache, block_tables, ctx, 1.5, 5)
    torch.testing.assert_close(got.double(), naive_prefill(q, cu, k_cache, v_cache, block_tables, ctx, 1.5),
                               rtol=1e-5, atol=1e-5)


def test_one_token_per_sequence_equals_the_decode_kernel():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([7, 20, 1, 33], 8, 3, 32, torch.float32, seed=12)
    q = make_queries(4, 9, 3, 32, torch.float32, seed=13)
    prefill = prefill_triton(q, torch.arange(5, dtype=torch.int32), k_cache, v_cache, block_tables, ctx, 0.2, 1)
    decode = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, ctx, 0.2, block_n=16)
    torch.testing.assert_close(prefill, decode, rtol=1e-5, atol=1e-6)


def test_rows_that_see_no_key_get_zeros():
    """Outside the contract (context_len < q_len puts the first new tokens before position 0), but as the decode
    kernel does for an empty context: a row with no visible key gets zeros, not an average of masked keys."""
    k_cache, v_cache, block_tables, _ = make_paged_cache([3], 4, 1, 16, torch.float32, seed=16)
    ctx = torch.tensor([1], dtype=torch.int32)  # three new tokens at positions -2, -1, 0
    q = make_queries(3, 2, 1, 16, torch.float32, seed=17)
    got = prefill_triton(q, cu_seqlens([3]), k_cache, v_cache, block_tables, ctx, 0.25, 3)
    assert not got[:2].any()
    torch.testing.assert_close(got[2], v_cache[block_tables[0, 0], 0].expand(2, 16))


def test_no_new_tokens_writes_nothing():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([5, 3], 4, 1, 16, torch.float32, seed=14)
    q = torch.empty(0, 2, 16)
    out = paged_prefill_attention_triton(q, torch.zeros(3, dtype=torch.int32), k_cache, v_cache, block_tables, ctx,
                                         0.25, 0)
    assert out.shape == (0, 2, 16)


def test_rejects_inputs_the_kernel_cannot_take():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([5, 3], 4, 2, 16, torch.float32, seed=15)
    q, cu = torch.randn(4, 6, 16), cu_seqlens([1, 3])
    args = (k_cache, v_cache, block_tables, ctx, 0.25, 3)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention_triton(torch.randn(4, 5, 16), cu, *args)
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention_triton(q.bfloat16(), cu, *args)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention_triton(q, cu.long(), *args)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention_triton(q, cu, k_cache, v_cache, block_tables.long(), ctx, 0.25, 3)
    with pytest.raises(ValueError, match=r"B \+ 1"):
        paged_prefill_attention_triton(q, cu[:2], *args)
    with pytest.raises(ValueError, match="out"):
        paged_prefill_attention_triton(q, cu, *args, out=torch.empty(4, 6, 8))
    with pytest.raises(ValueError, match="powers of two"):
        paged_prefill_attention_triton(q, cu, *args, block_m=24)
    with pytest.raises(ValueError, match="unit stride"):
        paged_prefill_attention_triton(torch.randn(4, 6, 32)[:, :, ::2], cu, *args)
