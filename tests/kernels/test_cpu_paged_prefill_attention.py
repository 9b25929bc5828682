"""The C prefill-attention kernel for CPU (csrc/cpu/paged_prefill_attention.c) against the float64 loop over
sequences, heads and cached positions that checks the other attention kernels, on shuffled paged caches whose
unowned slots are NaN, into a NaN-poisoned output."""
import pytest
import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.cpu_paged_attention import paged_decode_attention_cpu
from promptcot_engine.kernels.cpu_paged_prefill_attention import paged_prefill_attention_cpu
from promptcot_engine.kernels.paged_attention import paged_prefill_attention_torch
from tests.kernels.test_cpu_paged_attention import tolerance
from tests.kernels.test_paged_attention import make_paged_cache, make_queries, naive_attention_float64

pytestmark = pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")


def cu_seqlens(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def prefill(q, cu, k_cache, v_cache, block_tables, ctx, scale):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    got = paged_prefill_attention_cpu(q, cu, k_cache, v_cache, block_tables, ctx, scale, out=out)
    assert got is out
    return got


def naive_prefill(q, cu, k_cache, v_cache, block_tables, prefix_lens, context_lens, scale):
    return torch.cat([naive_attention_float64(q[cu[b]:cu[b + 1]], list(range(prefix_lens[b], context_lens[b])),
                                              k_cache, v_cache, block_tables[b], scale)
                      for b in range(len(context_lens))])


CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype, cached prefix lengths, new token counts
    (16, 9, 3, 64, torch.float32, [0, 5, 32, 17], [45, 1, 7, 16]),   # SmolLM2's heads: 16-row blocks mix tokens
    (16, 9, 3, 64, torch.bfloat16, [0, 5, 32, 17], [45, 1, 7, 16]),
    (32, 7, 1, 128, torch.bfloat16, [40, 0], [19, 33]),              # 7:1, blocks larger than the key tiles
    (5, 14, 2, 128, torch.float32, [12, 0, 3], [9, 21, 2]),          # odd block size: tiles across blocks
    (1, 4, 4, 16, torch.bfloat16, [9, 0], [6, 11]),                  # one token per block, no grouping
    (8, 6, 2, 96, torch.bfloat16, [23, 1], [5, 30]),                 # head_dim an odd multiple of 16
    (16, 8, 2, 256, torch.float32, [20], [18]),                      # the largest head it takes
    (4, 6, 2, 48, torch.float32, [7, 0, 3], [3, 40, 0]),             # a sequence with no new tokens
]


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype,prefix_lens,q_lens", CASES)
def test_matches_float64(block_size, num_heads, num_kv_heads, head_dim, dtype, prefix_lens, q_lens):
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    seed = block_size + head_dim
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = make_queries(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, seed + 1)  # strided rows
    cu, scale = cu_seqlens(q_lens), head_dim ** -0.5
    got = prefill(q, cu, k_cache, v_cache, block_tables, ctx, scale)
    assert got.dtype == dtype and got.shape == q.shape
    want = naive_prefill(q, cu, k_cache, v_cache, block_tables, prefix_lens, context_lens, scale)
    torch.testing.assert_close(got.double(), want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_online_softmax_over_many_tiles_with_a_peaked_distribution(dtype):
    """Hundreds of keys in tiles of 16, scores spread over hundreds: the running max moves from tile to tile
    and most weights underflow (the kernel's exp clamps below -87). fp32 scores of this size carry a few 1e-5
    of rounding into the weights, the torch path's as much: the kernel must err no more than it."""
    prefix_lens, q_lens = [300, 150], [20, 70]
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, 16, 3, 64, dtype, seed=3)
    q = (make_queries(sum(q_lens), 9, 3, 64, torch.float32, seed=4) * 40).to(dtype)
    cu = cu_seqlens(q_lens)
    want = naive_prefill(q, cu, k_cache, v_cache, block_tables, prefix_lens, context_lens, 0.125)
    got = prefill(q, cu, k_cache, v_cache, block_tables, ctx, 0.125).double()
    torch_path = paged_prefill_attention_torch(q, cu, k_cache, v_cache, block_tables, ctx, 0.125).double()
    assert (got - want).abs().max() <= 1.25 * (torch_path - want).abs().max() + 1e-6
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerance(dtype)
    torch.testing.assert_close(got, want, **tol)


def test_one_new_token_per_sequence_equals_decode():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([7, 20, 1, 64], 8, 3, 64, torch.float32, seed=12)
    q = make_queries(4, 9, 3, 64, torch.float32, seed=13)
    got = prefill(q, cu_seqlens([1] * 4), k_cache, v_cache, block_tables, ctx, 0.2)
    torch.testing.assert_close(got, paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, ctx, 0.2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_whatever_the_thread_count(dtype):
    """Each block of 16 query rows is computed whole by one thread: how many threads share the work changes
    nothing, bit for bit."""
    q_lens, prefix_lens = [30, 1, 17, 64, 5, 9], [0, 40, 16, 3, 90, 0]
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, 16, 3, 64, dtype, seed=11)
    q = make_queries(sum(q_lens), 9, 3, 64, dtype, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill(q, cu_seqlens(q_lens), k_cache, v_cache, block_tables, ctx, 0.125)
        torch.set_num_threads(max(2, threads))
        many = prefill(q, cu_seqlens(q_lens), k_cache, v_cache, block_tables, ctx, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_inputs_it_does_not_take():
    k_cache, v_cache, block_tables, ctx = make_paged_cache([4, 9], 4, 1, 16, torch.float32, seed=7)
    q = make_queries(6, 2, 1, 16, torch.float32, seed=8)
    with pytest.raises(ValueError, match="more new tokens than context"):  # 5 new tokens, a context of 4
        paged_prefill_attention_cpu(q, cu_seqlens([5, 1]), k_cache, v_cache, block_tables, ctx, 0.25)
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 5"):
        paged_prefill_attention_cpu(q, cu_seqlens([4, 1]), k_cache, v_cache, block_tables, ctx, 0.25)
    with pytest.raises(RuntimeError, match="does not take"):
        paged_prefill_attention_cpu(q.double(), cu_seqlens([4, 2]), k_cache.double(), v_cache.double(), block_tables,
                                    ctx, 0.25)
