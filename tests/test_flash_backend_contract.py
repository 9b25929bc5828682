"""The engine's calls into flash-attn, checked on CPU: a float64 stand-in for `flash_attn`, written from its
documented contract (varlen attention with a paged `block_table`, `flash_attn_with_kvcache` over a paged
cache, causal masks aligned to the bottom right, int32 index tensors, pages of a multiple of 256 tokens),
replaces the package, and the engine forced onto its `flash` backend must still generate transformers'
greedy tokens: through chunked prefill over cached context, preemption and decode. What this cannot check
is flash-attn itself; that needs a GPU (tests/test_engine_cuda.py)."""
import sys
import types

import pytest
import torch

from promptcot_engine import LLM
from promptcot_engine.attention import varlen
from promptcot_engine.attention.varlen import VarlenCausalAttention, cu_seqlens_from_lengths
from promptcot_engine.engine import model_runner
from tests.reference import hf_model
from tests.test_engine_generate import engine_greedy, hf_greedy, mixed_prompts


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [Lq, H, d], keys/values [Lk, Hkv, d] -> [Lq, H, d] in float64; query head h reads kv head h // (H / Hkv)."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    if causal:  # bottom-right aligned: the last query sees every key
        Lq, Lk = q.shape[0], keys.shape[0]
        visible = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def _paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens a block table points to: cache [num_blocks, page, Hkv, d]."""
    assert block_table.dtype == torch.int32 and cache.stride(-1) == 1
    page = cache.shape[1]
    assert page % 256 == 0, "flash-attn's paged kernels take pages of a multiple of 256 tokens"
    return cache[block_table[:-(-length // page)].long()].reshape(-1, *cache.shape[2:])[:length]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, block_table=None, **unsupported):
    assert not unsupported and dropout_p == 0.0
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.full_like(q, float("nan"))
    for b in range(len(cu_seqlens_q) - 1):
        q_start, q_end, k_start, k_end = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b],
                                                           cu_seqlens_k[b + 1]))
        assert q_end - q_start <= max_seqlen_q and k_end - k_start <= max_seqlen_k
        if block_table is None:
            keys, values = k[k_start:k_end], v[k_start:k_end]
        else:
            keys, values = _paged(k, block_table[b], k_end - k_start), _paged(v, block_table[b], k_end - k_start)
        out[q_start:q_end] = _attend(q[q_start:q_end], keys, values, scale, causal).to(q.dtype)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=False, **unsupported):
    assert k is None and v is None and not unsupported  # the engine stores new tokens itself
    assert q.dim() == 4 and cache_seqlens.dtype == torch.int32
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.full_like(q, float("nan"))
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        keys, values = _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length)
        out[b] = _attend(q[b], keys, values, scale, causal).to(q.dtype)
    return out


def use_flash_stand_in(monkeypatch) -> None:
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(model_runner, "resolve_attention_backend", lambda *args: "flash")


@pytest.mark.parametrize("variant,prompt_lengths", [
    (dict(), None),
    (dict(max_num_batched_tokens=7), None),  # prompts prefilled in chunks: varlen over the cached context
    # prompts that cross their first 256-token page while decoding, with pages for only one each: preemption
    (dict(num_kv_blocks=5, max_num_seqs=16), [250, 243, 238, 252, 200]),
])
def test_flash_backend_calls_keep_transformers_tokens(tiny_llama_dir, monkeypatch, variant, prompt_lengths):
    reference = hf_model(tiny_llama_dir)  # transformers looks for an installed flash_attn when it loads a model
    use_flash_stand_in(monkeypatch)
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", **variant)
    assert llm.engine.runner.backend == "flash" and llm.engine.runner.block_size == 256
    vocab = reference.config.vocab_size
    prompts = mixed_prompts(vocab)
    if prompt_lengths:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lengths]
    assert engine_greedy(llm, prompts) == hf_greedy(reference, prompts, sorted(llm.engine.eos_token_ids))
    if prompt_lengths:
        assert llm.engine.scheduler.num_preemptions > 0


def test_fresh_prefill_calls_flash_varlen_as_documented(monkeypatch):
    """Prefill with nothing cached goes to flash_attn_varlen_func for fp16/bf16 on CUDA: the same call, made
    on CPU to the stand-in, equals the SDPA path it replaces."""
    g = torch.Generator().manual_seed(0)
    cu_seqlens = cu_seqlens_from_lengths([5, 1, 12])
    q, k, v = (torch.randn(18, heads, 16, generator=g).to(torch.bfloat16) for heads in (6, 2, 2))
    expected = VarlenCausalAttention(cu_seqlens)(0, q, k, v)
    use_flash_stand_in(monkeypatch)
    monkeypatch.setattr(varlen, "flash_attn_available", lambda device: True)
    attention = VarlenCausalAttention(cu_seqlens)
    assert attention.flash_installed
    torch.testing.assert_close(attention(0, q, k, v), expected, rtol=2e-2, atol=2e-2)
