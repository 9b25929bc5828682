"""The CPU log-prob path (oneDNN products a vocabulary tile at a time, the running log-sum-exp in
csrc/cpu/logprob.c) against the float64 reference: tiles that do not divide the vocabulary, several row
blocks, bf16 inputs, ignored positions, argmax ties within and across tiles, targets on tile edges, and
its memory bounded by one tile of logits."""
import pytest
import torch

from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE, library
from promptcot_engine.kernels.cpu_logprob import cpu_logprob_applies, tiled_linear_logprob_cpu
from promptcot_engine.kernels.fused_logprob import IGNORE_INDEX, linear_logprob, linear_logprob_reference
from tests.kernels.test_fused_logprob import PeakNewMemory, assert_matches_reference, make_inputs, make_integer_inputs

pytestmark = pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")


@pytest.mark.parametrize("T,H,V,dtype,row_block,vocab_tile,tol", [
    (33, 40, 389, torch.float32, 8, 64, dict(rtol=1e-5, atol=1e-5)),     # 7 tiles, the last of 5 ids
    (33, 40, 389, torch.bfloat16, 16, 100, dict(rtol=1e-4, atol=1e-4)),
    (7, 24, 1000, torch.float32, 1024, 2048, dict(rtol=1e-5, atol=1e-5)),   # one tile wider than the vocabulary
    (65, 576, 49152, torch.bfloat16, 1024, 2048, dict(rtol=1e-4, atol=1e-4)),  # SmolLM2's head, odd T
])
def test_matches_float64_reference(T, H, V, dtype, row_block, vocab_tile, tol):
    hidden, weight, targets = make_inputs(T, H, V, dtype, seed=T + V)
    targets[1::5] = torch.tensor([0, V - 1, vocab_tile - 1, min(vocab_tile, V - 1)] * T)[:len(targets[1::5])]  # tile edges
    got = tiled_linear_logprob_cpu(hidden, weight, targets, IGNORE_INDEX, row_block, vocab_tile)
    assert_matches_reference(got, hidden, weight, targets, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ties_go_to_the_lowest_id(dtype):
    """Exact integer logits with ties within a tile and across tiles (tiles of 32 ids)."""
    hidden, weight, targets = make_integer_inputs(21, 16, 300, dtype, seed=4)
    want_logprobs, want_is_argmax = linear_logprob_reference(hidden, weight, targets)
    logprobs, is_argmax = tiled_linear_logprob_cpu(hidden, weight, targets, IGNORE_INDEX, 8, 32)
    assert torch.equal(is_argmax, want_is_argmax) and want_is_argmax.any() and not want_is_argmax.all()
    torch.testing.assert_close(logprobs.double(), want_logprobs, rtol=1e-5, atol=1e-5)


def test_dispatch_takes_it_on_cpu_and_memory_is_one_tile(monkeypatch):
    T, H, V = 512, 32, 4096
    hidden, weight, targets = make_inputs(T, H, V, torch.float32, seed=6)
    assert cpu_logprob_applies(hidden, weight)
    monkeypatch.setattr(tiled_linear_logprob_cpu, "__defaults__", (64, 256))  # row block, vocabulary tile
    calls = []
    original = library.pce_cpu_logprob_tile
    monkeypatch.setattr(library, "pce_cpu_logprob_tile", lambda *a: calls.append(a[2]) or original(*a))
    with torch.no_grad(), PeakNewMemory() as meter:
        got = linear_logprob(hidden, weight, targets)
    assert len(calls) == (T // 64) * (V // 256) and set(calls) == {256}  # the tiled path, tile by tile
    assert meter.peak <= 1.5 * 64 * 256 * 4, meter.peak  # one tile of fp32 logits and a few [64] vectors
    assert_matches_reference(got, hidden, weight, targets, dict(rtol=1e-5, atol=1e-5))


def test_not_taken_where_a_gradient_is_wanted_or_for_float64():
    hidden, weight, _ = make_inputs(4, 8, 50, torch.float32, seed=7)
    assert not cpu_logprob_applies(hidden.double(), weight.double())
    assert not cpu_logprob_applies(hidden, weight.requires_grad_())
