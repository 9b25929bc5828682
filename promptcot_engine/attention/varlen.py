"""Causal attention over packed variable-length sequences (no KV cache): the trainer's and the reference
forward's attention. Sequences are given by cu_seqlens (cumulative lengths, [num_seqs + 1]); a token only
attends to earlier tokens of its own sequence.

On CUDA with flash-attn installed, for fp16/bf16 (the only dtypes it takes), this is flash_attn_varlen_func.
Elsewhere the tokens are scattered into a right-padded [num_seqs, max_len] batch and run through SDPA with
is_causal: with right padding the causal mask already keeps every real query off the padding, so no explicit
block-diagonal mask is built, and the cost is num_seqs * max_len^2 rather than (total tokens)^2.
"""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class VarlenCausalAttention:
    def __init__(self, cu_seqlens: torch.Tensor):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        self.num_seqs, self.max_len = len(self.lengths), max(self.lengths)
        self.flash_installed = flash_attn_available(cu_seqlens.device)

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """The padded slot of each token: sequence index * max_len + offset within the sequence."""
        device = self.cu_seqlens.device
        seq_ids = torch.repeat_interleave(torch.arange(self.num_seqs, device=device),
                                          torch.tensor(self.lengths, device=device))
        offsets = torch.arange(int(self.cu_seqlens[-1]), device=device) - self.cu_seqlens[seq_ids].long()
        return seq_ids * self.max_len + offsets

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.flash_installed and q.dtype in FLASH_DTYPES:
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, causal=True)
        if self.num_seqs == 1:
            return _sdpa_causal(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]
        qp, kp, vp = (self._pad(x) for x in (q, k, v))
        out = _sdpa_causal(qp, kp, vp)
        return out.reshape(-1, *out.shape[2:])[self.padded_index]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.num_seqs * self.max_len, *x.shape[1:])
        padded[self.padded_index] = x
        return padded.view(self.num_seqs, self.max_len, *x.shape[1:])


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, heads, d] in and out; GQA handled by SDPA itself."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def cu_seqlens_from_lengths(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
