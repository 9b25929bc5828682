"""The decoder with its loss in one module forward: hidden states straight into the fused linear
cross-entropy, no logits tensor. The loss runs inside forward so that FSDP, which gathers a module's
parameters only around its forward and backward, has the LM head gathered while the loss uses it."""
from __future__ import annotations

import torch
from torch import nn

from promptcot_engine.attention.varlen import VarlenCausalAttention
from promptcot_engine.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from promptcot_engine.models.decoder import DecoderForCausalLM
from promptcot_engine.train.packing import PackedBatch


class CausalLMLoss(nn.Module):
    def __init__(self, model: DecoderForCausalLM, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: PackedBatch, reduction: str = "sum") -> torch.Tensor:
        """"sum": the summed token cross-entropy of the batch's targets; "none": per-token values [T]."""
        hidden = self.model(batch.input_ids, batch.positions, AutocastAttention(VarlenCausalAttention(batch.cu_seqlens)))
        return fused_linear_cross_entropy(hidden, self.model.lm_head.weight, batch.targets, reduction=reduction,
                                          chunk_size=self.chunk_size)


class AutocastAttention:
    """Hands attention q, k, v in the autocast dtype. With fp32 master weights the rotary tables are fp32,
    so q and k leave the rotary embedding in fp32 even under bf16 autocast; SDPA would cast them itself,
    but flash-attn's varlen kernel is not an autocast op and takes only fp16 / bf16."""

    def __init__(self, attention):
        self.attention = attention

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return self.attention(layer_idx, q, k, v)


def sequence_logprobs(token_losses: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[num_seqs]: each sequence's summed target log-probs, from per-token cross-entropies."""
    sums = torch.zeros(batch.num_seqs, dtype=token_losses.dtype, device=token_losses.device)
    return -sums.index_add(0, batch.sequence_index(), token_losses)
