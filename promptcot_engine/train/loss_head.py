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
        hidden = self.model(batch.input_ids, batch.positions, VarlenCausalAttention(batch.cu_seqlens))
        return fused_linear_cross_entropy(hidden, self.model.lm_head.weight, batch.targets, reduction=reduction,
                                          chunk_size=self.chunk_size)


def sequence_logprobs(token_losses: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[num_seqs]: each sequence's summed target log-probs, from per-token cross-entropies."""
    sums = torch.zeros(batch.num_seqs, dtype=token_losses.dtype, device=token_losses.device)
    return -sums.index_add(0, batch.sequence_index(), token_losses)
