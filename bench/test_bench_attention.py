"""Prefill attention on the CPU at the E-step's scoring shapes: the C kernel (paged_prefill_attention_cpu)
against the torch path it replaced (paged_prefill_attention_torch: new tokens padded to the longest, the
context gathered out of the blocks, one masked SDPA), the same queries over the same shuffled paged cache.
24 sequences of 200-420 new tokens after a 150-token cached prefix, SmolLM2's heads (9 query, 3 KV, 64 wide).
Prints ms per call, the causal FLOPs' GFLOP/s and the ratio.

Run: pytest bench/test_bench_attention.py --benchmark-only -s
"""
import pytest
import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.cpu_paged_prefill_attention import paged_prefill_attention_cpu
from promptcot_engine.kernels.paged_attention import PagedPrefill, paged_prefill_attention_torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, PREFIX = 9, 3, 64, 16, 150
SECONDS = {}


def make_batch(dtype):
    g = torch.Generator().manual_seed(0)
    q_lens = torch.randint(200, 421, (24,), generator=g).tolist()
    context_lens = [PREFIX + n for n in q_lens]
    blocks = [-(-n // BLOCK_SIZE) for n in context_lens]
    order = torch.randperm(sum(blocks), generator=g).tolist()
    width = max(blocks)
    block_tables = torch.tensor([[order.pop() for _ in range(n)] + [0] * (width - n) for n in blocks], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(sum(blocks), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=g).to(dtype)
    cu_seqlens_q = torch.nn.functional.pad(torch.tensor(q_lens).cumsum(0, dtype=torch.int32), (1, 0))
    flops = sum(4 * NUM_HEADS * HEAD_DIM * sum(range(c - n + 1, c + 1)) for c, n in zip(context_lens, q_lens))
    return (q, cu_seqlens_q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)), flops


@pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["torch", "c"])
def test_bench_prefill_attention(benchmark, capsys, path, dtype):
    args, flops = make_batch(dtype)
    scale = HEAD_DIM ** -0.5
    if path == "torch":  # planned once per step in the engine, as here
        plan = PagedPrefill.plan(args[1], args[4], args[5], BLOCK_SIZE)
        benchmark.pedantic(lambda: paged_prefill_attention_torch(*args, scale, plan), rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: paged_prefill_attention_cpu(*args, scale), rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    SECONDS[path, dtype] = seconds
    benchmark.extra_info.update(gflops=flops / seconds / 1e9)
    with capsys.disabled():
        print(f"\nprefill attention, {path}, {dtype}: {seconds * 1e3:.1f} ms, {flops / seconds / 1e9:.0f} GFLOP/s")
        if ("torch", dtype) in SECONDS and ("c", dtype) in SECONDS:
            print(f"c / torch speed: {SECONDS['torch', dtype] / SECONDS['c', dtype]:.2f}x")
