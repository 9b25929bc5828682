"""The sampler's draw on CPU in C (csrc/cpu/sampler.c), through kernels/cpu_library.py: each row's token from
its logits and one uniform number, the distribution softmax(logits) inverted at u. The same contract as
`promptcot_engine.engine.sampler.inverse_cdf(logits.softmax(-1), uniform)`, its reference, without writing the
softmax: see the C file.
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_library import DTYPE_CODES, library, takes


def cpu_sampler_applies(logits: torch.Tensor) -> bool:
    """Built, a CPU [rows, vocab] tensor in a dtype it takes (fp32, bf16), the vocabulary contiguous."""
    return takes(logits) and logits.dim() == 2 and logits.stride(-1) == 1


def sample_rows_cpu(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (fp32 or bf16; -inf for masked tokens), uniform [rows] or [rows, 1] fp64 in [0, 1)
    -> token ids int64 [rows]."""
    if not cpu_sampler_applies(logits):
        raise RuntimeError(f"the CPU sampler does not take {logits.dtype} logits {tuple(logits.shape)} on "
                           f"{logits.device} (or is not built)")
    rows, vocab = logits.shape
    uniform = uniform.reshape(rows).to(torch.float64).contiguous()
    tokens = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return tokens
    if library.pce_cpu_sample_rows(logits.data_ptr(), uniform.data_ptr(), tokens.data_ptr(), rows, vocab,
                                   logits.stride(0), DTYPE_CODES[logits.dtype]) != 0:
        raise MemoryError("sample_rows_cpu: no memory for its per-thread buffers")
    return tokens
