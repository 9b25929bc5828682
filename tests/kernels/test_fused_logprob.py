"""Teacher-forced log-probs against the float64 reference (full logits, log_softmax, gather): the Triton kernel
under TRITON_INTERPRET=1 into NaN-poisoned buffers, the chunked torch path, argmax ties, and the torch
path's memory bound measured by tracking every tensor it creates."""
import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from promptcot_engine.errors import InputError
from promptcot_engine.kernels import fused_logprob
from promptcot_engine.kernels.fused_logprob import (
    IGNORE_INDEX,
    chunked_linear_logprob,
    fused_linear_logprob,
    linear_logprob_partials_triton,
    linear_logprob_reference,
    merge_partials,
)

# a GPU run turns the interpreter off (TRITON_INTERPRET=0): the Triton kernel then runs compiled, on CUDA
KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
SMALL_BLOCKS = dict(block_t=16, block_v=64, block_h=16)


def make_inputs(T, H, V, dtype, seed, ignored_every=3):
    """Random hidden states and LM head; half the targets are the true argmax (so is_argmax has True
    answers to get right), the rest random; every ignored_every-th target ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g, dtype=torch.float64) * 2).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    argmax = (hidden.double() @ weight.double().T).argmax(-1)
    chosen = torch.arange(T) % 4 < 2  # so that every other row still mixes both kinds
    targets[chosen] = argmax[chosen]
    targets[::ignored_every] = IGNORE_INDEX
    return hidden, weight, targets


def make_integer_inputs(T, H, V, dtype, seed):
    """Zeros and ones: every logit is an exact small integer whatever the summation order, so argmax ties
    are common and exact; targets include each token's tied maximal ids."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(0, 2, (T, H), generator=g).to(dtype)
    weight = torch.randint(0, 2, (V, H), generator=g).to(dtype)
    logits = hidden.double() @ weight.double().T
    tied_max = [(row == row.max()).nonzero()[:, 0] for row in logits]
    assert sum(len(ids) > 1 for ids in tied_max) >= T // 2  # ties really are there
    # alternate the lowest tied id (the argmax) and the highest (not the argmax when tied)
    targets = torch.stack([ids[0] if t % 2 else ids[-1] for t, ids in enumerate(tied_max)])
    return hidden, weight, targets


def run_triton_into_poisoned_buffers(hidden, weight, targets, num_splits, **blocks):
    T, dev = hidden.shape[0], KERNEL_DEVICE
    split_lse, split_max, split_target_logit = (torch.full((num_splits, T), float("nan"), device=dev) for _ in range(3))
    split_argmax = torch.full((num_splits, T), -12345, dtype=torch.int32, device=dev)
    linear_logprob_partials_triton(hidden.to(dev), weight.to(dev), targets.to(dev), split_lse, split_max, split_argmax,
                                   split_target_logit, num_warps=1, num_stages=1, **blocks)
    split_lse, split_max, split_argmax, split_target_logit = (
        t.cpu() for t in (split_lse, split_max, split_argmax, split_target_logit))
    # every (range, token) written: nothing poisoned remains
    assert not split_max.isnan().any() and not split_target_logit.isnan().any() and not split_lse.isnan().any()
    assert (split_argmax >= 0).all() and (split_argmax < weight.shape[0]).all()
    return merge_partials(split_lse, split_max, split_argmax, split_target_logit, targets, IGNORE_INDEX)


def assert_matches_reference(got, hidden, weight, targets, tol):
    logprobs, is_argmax = got
    want_logprobs, want_is_argmax = linear_logprob_reference(hidden, weight, targets)
    assert logprobs.dtype == torch.float32 and is_argmax.dtype == torch.bool
    torch.testing.assert_close(logprobs.double(), want_logprobs, **tol)
    ignored = targets == IGNORE_INDEX
    assert (logprobs[ignored] == 0).all() and is_argmax[ignored].all()
    # is_argmax is decided on fp32 logits: compare where the top two float64 logits are clearly apart
    top2 = (hidden.double() @ weight.double().T).topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(is_argmax[clear], want_is_argmax[clear])
    assert want_is_argmax[clear & ~ignored].any() and not want_is_argmax[clear & ~ignored].all()


TRITON_CASES = [
    # T, H, V, dtype, num_splits, blocks
    (7, 24, 389, torch.float32, 1, SMALL_BLOCKS),    # V and H not multiples of their tiles, one token tile
    (33, 40, 1000, torch.float32, 3, SMALL_BLOCKS),  # three token tiles, the last nearly empty; uneven ranges
    (33, 40, 1000, torch.bfloat16, 2, SMALL_BLOCKS),
    (5, 16, 49152, torch.float32, 4, dict(block_t=16, block_v=512, block_h=16)),  # SmolLM2's vocabulary
]


@pytest.mark.parametrize("T,H,V,dtype,num_splits,blocks", TRITON_CASES)
def test_triton_kernel_matches_float64_reference(T, H, V, dtype, num_splits, blocks):
    hidden, weight, targets = make_inputs(T, H, V, dtype, seed=T + V)
    got = run_triton_into_poisoned_buffers(hidden, weight, targets, num_splits, **blocks)
    # bf16 inputs are exact in float64 and the products are accumulated in fp32 either way
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    assert_matches_reference(got, hidden, weight, targets, tol)


def test_triton_dispatch_with_strided_hidden_and_uneven_splits():
    """fused_linear_logprob as the engine calls it: rows of a larger hidden tensor; 7 vocabulary ranges
    asked for 16 tiles, which ranges of 3 tiles cover in 6."""
    hidden, weight, targets = make_inputs(38, 20, 1000, torch.float32, seed=3)
    got = fused_linear_logprob(hidden.to(KERNEL_DEVICE)[::2], weight.to(KERNEL_DEVICE), targets.to(KERNEL_DEVICE)[::2],
                               num_splits=7, num_warps=1, num_stages=1, **SMALL_BLOCKS)
    got = tuple(t.cpu() for t in got)
    assert_matches_reference(got, hidden[::2], weight, targets[::2], dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ties_go_to_the_lowest_id(dtype):
    hidden, weight, targets = make_integer_inputs(21, 16, 300, dtype, seed=4)
    want_logprobs, want_is_argmax = linear_logprob_reference(hidden, weight, targets)
    assert want_is_argmax.any() and not want_is_argmax.all()
    # ties within a tile, across tiles and across vocabulary ranges
    triton_result = run_triton_into_poisoned_buffers(hidden, weight, targets, 3, block_t=16, block_v=32, block_h=16)
    chunked_result = chunked_linear_logprob(hidden, weight, targets, chunk_tokens=8)
    for logprobs, is_argmax in (triton_result, chunked_result):
        assert torch.equal(is_argmax, want_is_argmax)
        torch.testing.assert_close(logprobs.double(), want_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,chunk_tokens,tol", [
    (torch.float64, 8, dict(rtol=1e-6, atol=1e-6)),  # only the fp32 output rounds
    (torch.float32, 8, dict(rtol=1e-5, atol=1e-5)),
    (torch.float32, None, dict(rtol=1e-5, atol=1e-5)),
    (torch.bfloat16, 5, dict(rtol=1e-4, atol=1e-4)),
])
def test_chunked_torch_path_matches_float64_reference(dtype, chunk_tokens, tol):
    hidden, weight, targets = make_inputs(33, 40, 389, dtype, seed=5)
    got = chunked_linear_logprob(hidden, weight, targets, chunk_tokens=chunk_tokens)
    assert_matches_reference(got, hidden, weight, targets, tol)


class PeakNewMemory(TorchDispatchMode):
    """Peak bytes of storage held by tensors created while the mode is active (a view or an in-place
    result counts with the storage it shares). Sees every aten op, so it cannot miss a [T, V] tensor."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> [bytes, tensors alive that use it]
        self.current = self.peak = 0

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outside = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.live:
                self.live[ptr][1] += 1
            elif ptr in outside or ptr == 0:
                continue  # a view of, or an in-place write into, a tensor made before the mode
            else:
                self.live[ptr] = [t.untyped_storage().nbytes(), 1]
                self.current += self.live[ptr][0]
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def test_chunked_path_memory_is_bounded_by_the_chunk(monkeypatch):
    T, H, V = 512, 32, 4096
    hidden, weight, targets = make_inputs(T, H, V, torch.float32, seed=6)
    full_logits_bytes = T * V * 4
    budget = 64 * 1024  # 4 tokens of logits per chunk: 1/128 of the full logits
    monkeypatch.setattr(fused_logprob, "LOGITS_BUDGET_BYTES", budget)
    with torch.no_grad(), PeakNewMemory() as meter:
        got = chunked_linear_logprob(hidden, weight, targets)  # with the default chunk
    # one chunk's logits, the [T] outputs and a few [chunk] vectors
    assert meter.peak <= 1.5 * budget, meter.peak
    assert_matches_reference(got, hidden, weight, targets, dict(rtol=1e-5, atol=1e-5))

    with torch.no_grad(), PeakNewMemory() as meter:
        linear_logprob_reference(hidden, weight, targets)
    assert meter.peak >= full_logits_bytes  # the meter does see a full [T, V] tensor


@pytest.mark.parametrize("fn", [chunked_linear_logprob, fused_linear_logprob])
def test_out_of_vocabulary_target_names_its_index(fn):
    hidden, weight, targets = make_inputs(6, 8, 50, torch.float32, seed=7)
    targets[4] = 50
    with pytest.raises(InputError, match="target token id 50 at index 4"):
        fn(hidden, weight, targets)
