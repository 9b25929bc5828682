"""AdamW and its learning-rate schedule: linear warmup, then cosine or linear decay to zero (the curves
transformers' get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup draw), or constant."""
from __future__ import annotations

import functools
import math

import torch

from promptcot_engine.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (norm weights and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
        # the fused kernel exists for CUDA and (since torch 2.4) for CPU
        fused=params[0].device.type in ("cuda", "cpu"),
    )


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = functools.partial(lr_multiplier, warmup_steps=config.warmup_steps(total_steps),
                                   total_steps=total_steps, schedule=config.lr_schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
