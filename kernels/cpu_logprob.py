"""Teacher-forced log-probs through the LM head on the CPU, a tile of the vocabulary at a time: each tile's
logits are a oneDNN product (`cpu_linear`) small enough to stay in cache, and the C pass of
csrc/cpu/logprob.c folds them into each row's running max, log-sum-exp, argmax and target logit, as the
Triton kernel in fused_logprob.py does on the GPU. Nothing [rows, vocab]-sized is ever written.

Against the chunked torch path (`chunked_linear_logprob`, whose 64 MiB chunks of logits go through memory
for each of torch's four passes), the products run about a fifth faster into cache-sized tiles and the
log-sum-exp costs two reads of a tile that is still in cache. The contract is `linear_logprob`'s, whose
dispatch checks the inputs.
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_library import library, takes
from promptcot_engine.kernels.cpu_linear import ONEDNN_AVAILABLE, cpu_linear, no_grad_wanted

ROW_BLOCK = 1024  # rows per pass over the vocabulary: the LM head's weight is read once per block
VOCAB_TILE = 2048  # vocabulary ids per product: a block's tile of logits (8 MiB in fp32) stays in cache


def cpu_logprob_applies(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """The C kernels built, CPU tensors of one dtype they take (fp32, bf16), oneDNN for the products, no
    gradient wanted."""
    return takes(hidden, weight) and ONEDNN_AVAILABLE and no_grad_wanted(hidden, weight)


def tiled_linear_logprob_cpu(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             row_block: int = ROW_BLOCK,
                             vocab_tile: int = VOCAB_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs fp32 [T], is_argmax bool [T]) for hidden [T, H], weight [V, H], targets [T] int64, as
    `linear_logprob`. bf16 inputs are multiplied in fp32 (one fp32 copy of the weight for the call): a bf16
    product would round every logit to 8 bits."""
    T, V = hidden.shape[0], weight.shape[0]
    weight = weight.float()
    logprobs = torch.empty(T, dtype=torch.float32)
    is_argmax = torch.empty(T, dtype=torch.bool)
    for start in range(0, T, row_block):
        rows = slice(start, start + row_block)
        block = hidden[rows].float().contiguous()
        block_targets = targets[rows].to(torch.int64).contiguous()
        n = block.shape[0]
        running_max = torch.full((n,), float("-inf"))
        running_sum = torch.zeros(n)
        argmax = torch.full((n,), -1, dtype=torch.int64)
        target_logit = torch.zeros(n)
        for v0 in range(0, V, vocab_tile):
            logits = cpu_linear(block, weight[v0:v0 + vocab_tile])
            library.pce_cpu_logprob_tile(logits.data_ptr(), n, logits.shape[1], logits.stride(0), v0,
                                         block_targets.data_ptr(), running_max.data_ptr(), running_sum.data_ptr(),
                                         argmax.data_ptr(), target_logit.data_ptr())
            del logits  # before the next tile's product: one tile of logits alive at a time
        ignored = block_targets == ignore_index
        logprobs[rows] = torch.where(ignored, 0.0, target_logit - running_max - running_sum.log())
        is_argmax[rows] = (argmax == block_targets) | ignored
    return logprobs, is_argmax
