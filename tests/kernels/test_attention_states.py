"""Partial attention with its log-sum-exp, and the exact merge of two parts, against float64 softmax."""
import pytest
import torch

from promptcot_engine.kernels.attention_states import attention_with_lse, merge_attn_states


def reference(q, k, v, scale, visible):
    """float64 softmax attention and log-sum-exp; visible [B, Lq, Lk] bool."""
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return torch.matmul(weights, v.double()), lse


def inputs(B, H, Lq, Lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((B, H, Lq, d), (B, H, Lk, d), (B, H, Lk, d))]


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_key_lengths_including_an_empty_row(dtype):
    q, k, v = inputs(3, 2, 5, 11, 16, dtype, seed=1)
    key_lens = torch.tensor([11, 0, 4])
    k[2, :, 4:] = 0  # past a length keys are zeroed by the caller (stale slots may be NaN)
    v[2, :, 4:] = 0
    out, lse = attention_with_lse(q, k, v, 0.3, key_lens=key_lens)
    visible = (torch.arange(11)[None, :] < key_lens[:, None])[:, None, :].expand(3, 5, 11)
    want_out, want_lse = reference(q, k, v, 0.3, visible)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), want_out, rtol=TOL[dtype], atol=TOL[dtype])
    assert not out[1].any() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(lse[[0, 2]].double(), want_lse[[0, 2]], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal(dtype):
    q, k, v = inputs(2, 3, 7, 7, 8, dtype, seed=2)
    out, lse = attention_with_lse(q, k, v, 0.5, causal=True)
    want_out, want_lse = reference(q, k, v, 0.5, torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(2, 7, 7))
    torch.testing.assert_close(out.double(), want_out, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(lse.double(), want_lse, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_two_parts_equals_attention_over_both(dtype):
    """A cached prefix (lengths vary, one empty) and a causal part over the new keys: the split of the
    prefill path."""
    q, k_new, v_new = inputs(3, 2, 6, 6, 16, dtype, seed=3)
    _, k_old, v_old = inputs(3, 2, 6, 9, 16, dtype, seed=4)
    prefix_lens = torch.tensor([9, 0, 2])
    for b, n in enumerate(prefix_lens.tolist()):
        k_old[b, :, n:] = 0
        v_old[b, :, n:] = 0
    a = attention_with_lse(q, k_old, v_old, 0.25, key_lens=prefix_lens)
    b = attention_with_lse(q, k_new, v_new, 0.25, causal=True)
    got = merge_attn_states(*a, *b)
    visible = torch.cat([(torch.arange(9)[None, None, :] < prefix_lens[:, None, None]).expand(3, 6, 9),
                         torch.ones(6, 6, dtype=torch.bool).tril()[None].expand(3, 6, 6)], dim=-1)
    want, _ = reference(q, torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2), 0.25, visible)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
