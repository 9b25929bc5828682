"""Sampler: next tokens from a batch of logits, each row with its own SamplingParams.

Greedy rows take the argmax. Other rows are scaled by temperature, truncated by top_k, top_p and min_p,
and sampled by inverting their CDF with one uniform number per row (a vocabulary-sized noise vector per row,
as the Gumbel or exponential tricks need, costs more than the rest of the sampler on CPU). The caller gives
the numbers: the engine takes each from its sample's own random stream (engine/random_streams.py), so a
seeded sample's tokens never depend on what else is in the batch. On CPU the draw itself (softmax and CDF
inversion) runs in C where it is built (kernels/cpu_sampler.py), never writing the softmax.
"""
from __future__ import annotations

import torch

from promptcot_engine.kernels.cpu_sampler import cpu_sampler_applies, sample_rows_cpu
from promptcot_engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top_k (<= 0: off) and top_p nucleus; the best token
    always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(sorted_logits)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def processed_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p applied to non-greedy rows (greedy rows pass through), in fp32;
    logits come back as they are when no row asks for any."""
    device = logits.device
    if not any(p.temperature not in (0, 1) or p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        return logits
    logits = logits.float()
    if any(p.temperature not in (0, 1) for p in params):
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype))
    return logits


_CDF_CHUNK = 1024


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds u * total mass, found in two levels: first the chunk of
    _CDF_CHUNK tokens (a fp64 CDF over chunk masses), then the token inside that chunk. This touches the full
    vocabulary once instead of building a full-width fp64 CDF. `right=True` skips zero-probability tokens
    (their CDF equals their predecessor's), even at u = 0."""
    rows, vocab = probs.shape
    chunks = -(-vocab // _CDF_CHUNK)
    padded = probs if vocab % _CDF_CHUNK == 0 else torch.nn.functional.pad(probs, (0, chunks * _CDF_CHUNK - vocab))
    padded = padded.view(rows, chunks, _CDF_CHUNK)
    chunk_cdf = padded.sum(dim=-1).double().cumsum(dim=-1)
    target = uniform * chunk_cdf[:, -1:]
    chunk = torch.searchsorted(chunk_cdf, target, right=True).clamp_(max=chunks - 1)
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    inside = padded[torch.arange(rows, device=probs.device), chunk.squeeze(-1)].double()
    index = torch.searchsorted(inside.cumsum(dim=-1), target - before, right=True)
    # rounding can put the target just past the chunk's summed mass: fall back to its last live token
    last_live = torch.where(inside > 0, torch.arange(_CDF_CHUNK, device=probs.device), -1).amax(dim=-1, keepdim=True)
    return (chunk * _CDF_CHUNK + torch.minimum(index, last_live)).squeeze(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor | None,
           want_logprobs: bool = False, cpu_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (token ids [B], log-prob of each under the unmodified model distribution, or None).
    uniform: [B] float64 in [0, 1) on logits' device, the number each sampled row inverts its CDF at (greedy
    rows ignore theirs; None when every row is greedy). cpu_kernel: on CPU, draw with the C sampler
    (kernels/cpu_sampler.py) where it is built; False: torch's softmax and `inverse_cdf`, the reference."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(dim=-1)  # bf16 widens to fp32 exactly: the same argmax
    else:
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        rows_logits, rows_uniform = logits, uniform
        if greedy_rows:  # argmax only where wanted: over the whole batch it costs as much as the sampling
            tokens[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
            rows = [i for i, g in enumerate(greedy) if not g]
            rows_logits, rows_uniform = logits[rows], uniform[rows]
        sampled = processed_logits(rows_logits, [p for p, g in zip(params, greedy) if not g])
        if cpu_kernel and cpu_sampler_applies(sampled):
            drawn = sample_rows_cpu(sampled, rows_uniform[:, None])
        else:
            drawn = inverse_cdf(sampled.float().softmax(dim=-1), rows_uniform[:, None])
        if greedy_rows:
            tokens[rows] = drawn
        else:
            tokens = drawn
    logprobs = None
    if want_logprobs:
        logprobs = logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
