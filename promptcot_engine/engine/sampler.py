"""Sampler: next tokens from a batch of logits, each row with its own SamplingParams.

Greedy rows take the argmax. Other rows are scaled by temperature, truncated by top_k, top_p and min_p,
and sampled by the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p and needs
one vector of noise per row. A seeded row draws its noise from its own generator, so its tokens never
depend on what else is in the batch; unseeded rows share one batched draw from the engine's generator.
"""
from __future__ import annotations

import torch

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
    """Temperature, top_k, top_p and min_p applied to non-greedy rows (greedy rows pass through)."""
    device = logits.device
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator, want_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (token ids [B], log-prob of each under the unmodified model distribution, or None)."""
    logits = logits.float()
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten().tolist()
        probs = processed_logits(logits[rows], [params[i] for i in rows]).softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(generator=default_generator)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                noise[j].exponential_(generator=generators[i])
        tokens[rows] = (probs / noise).argmax(dim=-1)
    logprobs = None
    if want_logprobs:
        logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
