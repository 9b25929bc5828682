"""TrainConfig: every training setting, validated at construction (a bad value is an InputError naming it)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from promptcot_engine.errors import InputError
from promptcot_engine.train.activation_checkpointing import MODES as AC_MODES

OBJECTIVES = ("sft", "dpo")
LR_SCHEDULES = ("cosine", "linear", "constant")
TRUNCATIONS = ("truncate", "skip")


@dataclass
class TrainConfig:
    objective: str = "sft"
    lr: float = 2e-5
    epochs: int = 1
    # examples (DPO: preference pairs) per optimizer step, over all ranks and accumulation micro-batches
    batch_size: int = 16
    # micro-batches per optimizer step on each rank; the step's loss is normalized over all of them
    grad_accum: int = 1
    # tokens per example (prompt + completion); what to do with longer ones: "truncate" or "skip"
    max_length: int = 2048
    truncation: str = "truncate"
    # a number below 1 is a fraction of the total steps, otherwise a step count
    warmup: float = 0.0
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # None or 0 turns clipping off (the norm is still reported)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # "selective" recomputes the pointwise work between matrix products in backward (about half the
    # activation memory for a few percent of time), "full" whole decoder layers, "none" nothing; True
    # means "full", False "none"
    activation_checkpointing: bool | str = "selective"
    # bf16 autocast; None means "on CUDA devices that support bf16"
    bf16: bool | None = None
    dpo_beta: float = 0.1
    # where metrics.jsonl, checkpoint-<step>/ and the final model go; None keeps everything in memory
    output_dir: str | None = None
    # write a resumable checkpoint every this many optimizer steps (0: only the final model)
    save_steps: int = 0
    # tokens per chunk of the fused loss; None picks one from the vocabulary and hidden sizes
    loss_chunk_size: int | None = None

    def __post_init__(self):
        def fail(name, why):
            raise InputError(f"TrainConfig.{name}: {why} (got {getattr(self, name)!r})")

        if self.activation_checkpointing is True or self.activation_checkpointing is False:
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        if self.activation_checkpointing not in AC_MODES:
            fail("activation_checkpointing", f"choose one of {', '.join(AC_MODES)} (or True / False)")
        if self.objective not in OBJECTIVES:
            fail("objective", f"choose one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            fail("lr_schedule", f"choose one of {', '.join(LR_SCHEDULES)}")
        if self.truncation not in TRUNCATIONS:
            fail("truncation", f"choose one of {', '.join(TRUNCATIONS)}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be a positive integer")
        if self.max_length < 2:
            fail("max_length", "must leave room for a prompt token and a target")
        for name in ("lr", "warmup", "weight_decay", "adam_eps", "dpo_beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(name, "must be a finite number >= 0")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            fail("warmup", "a value of 1 or more is a step count and must be whole")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            fail("max_grad_norm", "must be a number >= 0 or None")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            fail("adam_betas", "must be two numbers in [0, 1)")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            fail("save_steps", "must be an integer >= 0")
        if self.loss_chunk_size is not None and (not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1):
            fail("loss_chunk_size", "must be a positive integer or None")
        if self.save_steps and self.output_dir is None:
            fail("save_steps", "checkpoints need an output_dir")
        self.adam_betas = tuple(self.adam_betas)

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup) if self.warmup >= 1 else math.ceil(self.warmup * total_steps)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
