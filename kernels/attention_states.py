"""Attention over a context split in parts: each part's softmax with its log-sum-exp, merged exactly.

softmax over keys A and B together equals the two partial results weighted by exp(lse_A - lse) and
exp(lse_B - lse), lse = log(exp(lse_A) + exp(lse_B)). CPU decode uses it to read a prompt shared by several
samples once for all of them (attention/shared_prefix.py), each part on torch's fused CPU attention kernel.
"""
from __future__ import annotations

import torch

# torch's fused CPU attention returns the log-sum-exp beside the output (F.scaled_dot_product_attention
# does not expose it); it handles fp32, fp64, bf16 and fp16 with fp32 accumulation
_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def additive_key_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """visible [B, num_keys] bool -> the additive mask [B, 1, 1, num_keys]: 0 where visible, -inf elsewhere."""
    mask = torch.zeros(*visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
    return mask[:, None, None, :]


def key_length_mask(key_lens: torch.Tensor, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [B, 1, 1, num_keys] (0 or -inf) that lets row b see its first key_lens[b] keys."""
    return additive_key_mask(torch.arange(num_keys, device=key_lens.device)[None, :] < key_lens[:, None], dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                       key_lens: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Lq, d], k and v [B, H, Lk, d] (any strides) -> out [B, H, Lq, d] in q's dtype and lse [B, H, Lq]
    in fp32 (fp64 for fp64). key_lens [B]: row b sees only its first key_lens[b] keys (the rest must be
    finite: zero them); a row that sees no key gets out 0 and lse -inf, so merging it changes nothing.
    key_mask: `key_length_mask(key_lens, Lk, ...)`, for a caller that reuses it across layers.
    causal: query i sees keys up to i (top-left aligned, as SDPA's is_causal)."""
    mask = None
    if key_lens is not None:
        mask = key_length_mask(key_lens, k.shape[2], q.dtype) if key_mask is None else key_mask.to(q.dtype)
    if q.device.type == "cpu" and q.dtype != torch.float64:  # the fused kernel computes fp64 in fp32
        out, lse = _flash_attention_cpu(q, k, v, is_causal=causal, attn_mask=mask, scale=scale)
    else:
        out, lse = _attention_with_lse_math(q, k, v, scale, mask, causal)
    if key_lens is not None:
        empty = (key_lens == 0)[:, None, None]
        out = out.masked_fill(empty[..., None], 0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _attention_with_lse_math(q, k, v, scale, mask, causal):
    """The same with the scores materialized (other devices, and fp64), in fp32 at least."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.to(dtype)
    if causal:
        Lq, Lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(dtype).min)[..., None])
    return torch.matmul(weights, v.to(dtype)).to(q.dtype), lse


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's normalized output [..., Lq, d] and
    log-sum-exp [..., Lq]. At least one of the two must see a key in every row."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse)[..., None]
    weight_b = torch.exp(lse_b - lse)[..., None]
    dtype = torch.promote_types(out_a.dtype, torch.float32)
    return (out_a.to(dtype) * weight_a + out_b.to(dtype) * weight_b).to(out_a.dtype)
