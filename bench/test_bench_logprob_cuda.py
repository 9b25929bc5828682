"""The fused log-prob kernel on CUDA: achieved TFLOP/s against the card's dense bf16 peak, and the speed and
peak memory of the torch computation it replaces (full logits, fp32 log_softmax, gather) on the same input,
at SmolLM2-135M's LM head and at a 7B model's (Qwen2.5-7B: H=3584, V=152064), bf16, 8192 tokens.

Run: pytest bench/test_bench_logprob_cuda.py --benchmark-only (skipped without a CUDA device)
"""
import pytest
import torch

from promptcot_engine.benchmarks.logprob_kernel import logprob_kernel_roofline
from promptcot_engine.kernels.fused_logprob import fused_linear_logprob

HEADS = {"smollm2_135m": (576, 49152), "qwen2.5_7b": (3584, 152064)}
TOKENS = 8192


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head", sorted(HEADS))
def test_bench_logprob_kernel_cuda(benchmark, record_result, head):
    hidden_size, vocab = HEADS[head]
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size ** 0.5).to(torch.bfloat16)
    result = logprob_kernel_roofline(TOKENS, weight)
    hidden = torch.randn(TOKENS, hidden_size, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (TOKENS,), device="cuda")

    def call():
        fused_linear_logprob(hidden, weight, targets)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    record_result(result)
