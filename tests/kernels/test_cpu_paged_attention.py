"""The C decode-attention kernel for CPU (csrc/cpu_paged_attention.c) against the float64 loop over sequences,
heads and cached positions that checks the Triton kernel, on the same shuffled paged caches whose unowned
slots are NaN, into a NaN-poisoned output."""
import pytest
import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.cpu_paged_attention import (cpu_attention_kernels_apply, has_bf16_dot,
                                                          paged_decode_attention_cpu)
from tests.kernels.test_paged_attention import make_paged_cache, make_queries, naive_decode

needs_kernel = pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")


def tolerance(dtype):
    # bf16: the kernel computes in fp32 and rounds once, at the output (half a bf16 ulp, 2^-9 relative)
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-14)


def decode(q, k_cache, v_cache, block_tables, ctx, scale, bf16_dot=True):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    got = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, ctx, scale, out=out, bf16_dot=bf16_dot)
    assert got is out
    return got


CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype, context_lens
    (16, 9, 3, 64, torch.float32, [1, 17, 40, 16, 15]),     # SmolLM2's heads, 3:1; tiles ending inside blocks
    (16, 9, 3, 64, torch.bfloat16, [1, 17, 40, 16, 15]),
    (32, 7, 1, 128, torch.bfloat16, [33, 5, 64]),           # 7:1, blocks larger than the 16-token tiles
    (5, 14, 2, 128, torch.float32, [12, 3, 31]),            # odd block size: tiles across block boundaries
    (1, 4, 4, 16, torch.bfloat16, [9, 2]),                  # one token per block, no grouping, head_dim 16
    (8, 6, 2, 96, torch.bfloat16, [23, 1, 48]),             # head_dim an odd multiple of 16 (bf16 tail)
    (16, 8, 2, 256, torch.float32, [70]),                   # the largest head it takes
    (4, 6, 2, 48, torch.float32, [7, 130]),
]


# bf16 runs both ways: the vdpbf16ps path (where the CPU has it and head_dim is a multiple of 32) and the fp32 one
PATHS = [pytest.param(*case, True, id=f"{i}-bf16dot") for i, case in enumerate(CASES)] + [
    pytest.param(*case, False, id=f"{i}-fp32") for i, case in enumerate(CASES) if case[4] == torch.bfloat16]


@needs_kernel
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype,context_lens,bf16_dot", PATHS)
def test_matches_float64(block_size, num_heads, num_kv_heads, head_dim, dtype, context_lens, bf16_dot):
    seed = block_size + head_dim + num_heads
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = make_queries(len(context_lens), num_heads, num_kv_heads, head_dim, dtype, seed + 1)  # strided rows
    scale = head_dim ** -0.5
    got = decode(q, k_cache, v_cache, block_tables, ctx, scale, bf16_dot)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), naive_decode(q, k_cache, v_cache, block_tables, ctx, scale), **tolerance(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype,bf16_dot", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_peaked_softmax_over_a_long_context(dtype, bf16_dot):
    """Scores spread over hundreds: most weights underflow to zero (the kernel's exp clamps below -87), one
    key dominates, and the result must still be the float64 one. fp32 scores of this size carry ~1e-5 of
    rounding into the weights (torch's fp32 path errs as much here), hence the wider fp32 tolerance."""
    context_lens = [700, 333]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(context_lens, 16, 3, 64, dtype, seed=3)
    q = (make_queries(2, 9, 3, 64, torch.float32, seed=4) * 40).to(dtype)
    got = decode(q, k_cache, v_cache, block_tables, ctx, 0.125, bf16_dot)
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else tolerance(dtype)
    torch.testing.assert_close(got.double(), naive_decode(q, k_cache, v_cache, block_tables, ctx, 0.125), **tol)


@needs_kernel
def test_empty_context_gives_zeros_without_disturbing_other_rows():
    k_cache, v_cache, block_tables, _ = make_paged_cache([10, 4], 4, 1, 16, torch.float32, seed=7)
    ctx = torch.tensor([10, 0], dtype=torch.int32)  # row 1 as a padding row
    q = make_queries(2, 2, 1, 16, torch.float32, seed=8)
    got = decode(q, k_cache, v_cache, block_tables, ctx, 0.25)
    torch.testing.assert_close(got[:1].double(), naive_decode(q[:1], k_cache, v_cache, block_tables[:1], ctx[:1], 0.25),
                               **tolerance(torch.float32))
    assert not got[1].any()


@needs_kernel
@pytest.mark.parametrize("dtype,bf16_dot", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_same_bits_whatever_the_thread_count(dtype, bf16_dot):
    """Each (sequence, KV head) is computed whole by one thread: how many threads share the batch changes
    nothing, bit for bit."""
    k_cache, v_cache, block_tables, ctx = make_paged_cache([5, 90, 31, 64, 1, 17] * 4, 16, 3, 64, dtype, seed=11)
    q = make_queries(24, 9, 3, 64, dtype, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(q, k_cache, v_cache, block_tables, ctx, 0.125, bf16_dot)
        torch.set_num_threads(max(2, threads))
        many = decode(q, k_cache, v_cache, block_tables, ctx, 0.125, bf16_dot)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_kernel
@pytest.mark.skipif(not has_bf16_dot(), reason="this CPU has no AVX512-BF16")
def test_bf16_dot_path_is_taken_where_the_cpu_has_it():
    """The two bf16 paths weigh the values with 16 and 24 significant bits: over a few hundred outputs some
    round to a different bf16 value, so equal results would mean one path ran twice. head_dim 48 (not a
    multiple of 32) has only the fp32 path: there both requests give the same bits."""
    k_cache, v_cache, block_tables, ctx = make_paged_cache([90, 31, 64, 17] * 4, 16, 3, 64, torch.bfloat16, seed=13)
    q = make_queries(16, 9, 3, 64, torch.bfloat16, seed=14)
    assert not torch.equal(decode(q, k_cache, v_cache, block_tables, ctx, 0.125, True),
                           decode(q, k_cache, v_cache, block_tables, ctx, 0.125, False))
    k_cache, v_cache, block_tables, ctx = make_paged_cache([40, 7], 16, 2, 48, torch.bfloat16, seed=15)
    q = make_queries(2, 6, 2, 48, torch.bfloat16, seed=16)
    assert torch.equal(decode(q, k_cache, v_cache, block_tables, ctx, 0.2, True),
                       decode(q, k_cache, v_cache, block_tables, ctx, 0.2, False))


def test_shapes_it_does_not_take():
    q = torch.zeros(2, 4, 24)
    cache = torch.zeros(3, 16, 2, 24)
    assert not cpu_attention_kernels_apply(q, cache)  # head_dim not a multiple of 16
    assert not cpu_attention_kernels_apply(q.double(), cache.double())
    assert not cpu_attention_kernels_apply(torch.zeros(2, 4, 32), torch.zeros(3, 16, 2, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not take"):
        paged_decode_attention_cpu(q, cache, cache, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2), 0.2)
