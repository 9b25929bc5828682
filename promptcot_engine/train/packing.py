"""Sequence packing: a micro-batch's sequences concatenated into one flat token stream with no padding.
cu_seqlens marks the sequences, so attention stays inside each one and every position restarts at 0;
targets are shifted within each sequence, so no sequence is ever trained to predict its neighbour."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptcot_engine.attention.varlen import cu_seqlens_from_lengths
from promptcot_engine.kernels.fused_linear_cross_entropy import IGNORE_INDEX


@dataclass
class PackedBatch:
    input_ids: torch.Tensor   # [T]
    positions: torch.Tensor   # [T], from 0 in every sequence
    targets: torch.Tensor     # [T], the next token's label; IGNORE_INDEX at each sequence's last token
    cu_seqlens: torch.Tensor  # [num_seqs + 1], int32

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def sequence_index(self) -> torch.Tensor:
        """[T]: which sequence each token belongs to (for per-sequence sums)."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=lengths.device), lengths.long())


def pack(sequences: list[tuple[list[int], list[int]]], device: torch.device | str = "cpu") -> PackedBatch:
    """Pack (input_ids, labels) pairs, labels unshifted as transformers takes them."""
    input_ids, positions, targets = [], [], []
    for ids, labels in sequences:
        input_ids.extend(ids)
        positions.extend(range(len(ids)))
        targets.extend(labels[1:])
        targets.append(IGNORE_INDEX)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    lengths = [len(ids) for ids, _ in sequences]
    return PackedBatch(as_tensor(input_ids), as_tensor(positions), as_tensor(targets),
                       cu_seqlens_from_lengths(lengths, device))


def padding_batch(device: torch.device | str = "cpu") -> PackedBatch:
    """One token with no target: what a rank with no examples left in a step runs, so that every rank
    makes the same collective calls (FSDP gathers parameters in every forward and backward)."""
    return pack([([0], [IGNORE_INDEX])], device)
