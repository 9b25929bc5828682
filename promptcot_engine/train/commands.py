"""CLI: promptcot train (alone, or under `torchrun --nproc-per-node N -m promptcot_engine.cli train ...`)."""
from __future__ import annotations

from pathlib import Path

import click

from promptcot_engine.errors import InputError
from promptcot_engine.train.config import AC_MODES, LR_SCHEDULES, OBJECTIVES, TRUNCATIONS, TrainConfig

_DEFAULTS = TrainConfig()


@click.command()
@click.option("--model", required=True, help="Starting model: an HF checkpoint directory, a .gguf file or a packaged model name.")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL: {"prompt","completion"} or {"messages"} for sft, {"prompt","chosen","rejected"} for dpo.')
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the trained model (HF files), metrics.jsonl and checkpoint-<step>/ directories.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=_DEFAULTS.objective, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Peak learning rate (the paper: 2e-5 cold-start SFT, 2e-6 EM steps, 1e-6 DPO).")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True,
              help="Examples (dpo: pairs) per optimizer step, over all ranks and accumulation steps.")
@click.option("--grad-accum", type=int, default=_DEFAULTS.grad_accum, show_default=True, help="Micro-batches per optimizer step on each rank.")
@click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True, help="Tokens per example, prompt included.")
@click.option("--truncation", type=click.Choice(TRUNCATIONS), default=_DEFAULTS.truncation, show_default=True,
              help="What to do with examples longer than --max-length (counted in metrics.jsonl either way).")
@click.option("--warmup", type=float, default=_DEFAULTS.warmup, show_default=True, help="Warmup: a fraction of the steps if below 1, else a step count.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=_DEFAULTS.lr_schedule, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm, show_default=True, help="0 turns clipping off.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--beta", type=float, default=_DEFAULTS.dpo_beta, show_default=True, help="DPO beta.")
@click.option("--activation-checkpointing", type=click.Choice(AC_MODES), default=_DEFAULTS.activation_checkpointing,
              show_default=True,
              help="Recompute activations in backward: the pointwise work between matrix products (selective) "
                   "or whole decoder layers (full).")
@click.option("--save-steps", type=int, default=_DEFAULTS.save_steps, show_default=True,
              help="Write a resumable checkpoint every this many steps (0: only the final model).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue a run from a checkpoint directory; alone, from the latest one in --output.")
@click.option("--dtype", default="float32", show_default=True, help="Weight dtype (bf16 compute on GPU comes from autocast).")
@click.option("--device", default="auto", show_default=True)
def train(model, data, output, objective, lr, epochs, batch_size, grad_accum, max_length, truncation, warmup, lr_schedule,
          weight_decay, max_grad_norm, seed, beta, activation_checkpointing, save_steps, resume, dtype, device):
    """Fine-tune MODEL on DATA with SFT or DPO; write the result to OUTPUT as an HF checkpoint directory."""
    from promptcot_engine.train.checkpoint import latest_checkpoint
    from promptcot_engine.train.trainer import Trainer

    config = TrainConfig(objective=objective, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                         max_length=max_length, truncation=truncation, warmup=warmup, lr_schedule=lr_schedule,
                         weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, dpo_beta=beta,
                         activation_checkpointing=activation_checkpointing, save_steps=save_steps, output_dir=str(output))
    if resume == "latest":
        resume = latest_checkpoint(output)
        if resume is None:
            raise InputError(f"--resume: no checkpoint-<step> directory with a training state in {output}")
    elif resume is None and output.exists() and any(output.iterdir()):
        raise InputError(f"{output}: directory exists and is not empty (use --resume to continue the run in it)")
    # a resumed run starts from the checkpoint's weights; --model only has to name the run's model
    trainer = Trainer.from_pretrained(resume if resume is not None else model, config, dtype=dtype, device=device)
    result = trainer.train(data, resume_from=resume)
    if trainer.dist.is_main:
        if result["truncated"] or result["skipped_too_long"]:
            click.echo(f"warning: examples longer than --max-length {max_length}: {result['truncated']} truncated, "
                       f"{result['skipped_too_long']} skipped (of {result['records']})", err=True)
        click.echo(f"wrote {output} ({result['step']} steps, final loss {result['loss']:.4f})")
