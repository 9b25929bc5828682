"""Shared-prefix decode attention equals plain paged decode attention over the whole context."""
import pytest
import torch

from promptcot_engine.attention.shared_prefix import plan_shared_prefix, shared_prefix_decode_attention
from promptcot_engine.kernels.paged_attention import paged_decode_attention_torch


def forked_tables(block_size: int, seed: int):
    """Requests with several samples each (sharing their prompt's full blocks), plus a lone sequence, with
    block ids shuffled over a pool; unused slots poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(400, generator=g).tolist()
    preamble = [free.pop()]  # every prompt but the last starts with the same block (a common instruction)
    tables, lengths = [], []
    for prompt_len, samples in ((37, 4), (16, 3), (5, 2), (50, 1)):
        prompt_blocks = (preamble if prompt_len >= block_size and prompt_len < 50 else [])
        prompt_blocks = prompt_blocks + [free.pop() for _ in range(prompt_len // block_size - len(prompt_blocks))]
        for _ in range(samples):
            context = prompt_len + int(torch.randint(1, 40, (), generator=g))
            own = -(-context // block_size) - len(prompt_blocks)
            tables.append(prompt_blocks + [free.pop() for _ in range(own)])
            lengths.append(context)
    return tables, lengths


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (7, 1, 32)])
def test_equals_paged_decode(dtype, tol, num_heads, num_kv_heads, head_dim):
    block_size = 8
    tables, lengths = forked_tables(block_size, seed=num_heads)
    k_cache = torch.full((400, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for table, length in zip(tables, lengths):
        for p in range(length):
            k_cache[table[p // block_size], p % block_size] = torch.randn(num_kv_heads, head_dim).to(dtype)
            v_cache[table[p // block_size], p % block_size] = torch.randn(num_kv_heads, head_dim).to(dtype)
    q = torch.randn(len(tables), num_heads, head_dim).to(dtype)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    plan = plan_shared_prefix(tables, lengths, block_size, q.device)
    assert plan is not None and plan.max_members == 4
    # 37 // 8 and 16 // 8 shared blocks (the shared preamble block does not merge the two requests); the
    # 5-token prompt has no full block, so its samples stand alone
    assert (plan.prefix.key_lens // block_size).tolist() == [4, 2, 0, 0, 0]
    got = shared_prefix_decode_attention(q, k_cache, v_cache, plan, head_dim ** -0.5)
    expected = paged_decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), block_tables, context_lens,
                                            head_dim ** -0.5)
    assert torch.isfinite(got).all()
    assert (got.double() - expected).abs().max().item() < tol


def test_no_plan_without_sharing():
    assert plan_shared_prefix([[1, 2], [3, 4], [5]], [10, 12, 3], 8, torch.device("cpu")) is None
