"""Trainer: SFT and DPO on a DecoderForCausalLM, in-process (the EM loop hands it the engine's model and
gets the same object back, trained) or from `promptcot train`, alone or under torchrun with FSDP2.

One optimizer step takes a global batch of `batch_size` examples (sampler.py says which), split over the
ranks and `grad_accum` packed micro-batches per rank. The SFT loss of a step is the sum of its target
tokens' cross-entropies divided by the step's total target count, whatever the split; the DPO loss is the
mean over the step's pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with sequence
log-prob sums over the completion tokens and the reference log-probs of the initial model (computed once
before the first update, or taken from the records).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from promptcot_engine.errors import InputError
from promptcot_engine.models.decoder import DecoderForCausalLM
from promptcot_engine.models.loader import load_model
from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.train import distributed
from promptcot_engine.train.activation_checkpointing import activation_checkpointing
from promptcot_engine.train.checkpoint import (
    checkpoint_path,
    load_checkpoint_weights,
    read_training_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_model,
)
from promptcot_engine.train.config import TrainConfig
from promptcot_engine.train.data import PreferenceExample, SFTExample, read_records, tokenize_preferences, tokenize_sft
from promptcot_engine.train.loss_head import CausalLMLoss, sequence_logprobs
from promptcot_engine.train.metrics import MetricsLog
from promptcot_engine.train.packing import PackedBatch, pack, padding_batch
from promptcot_engine.train.sampler import micro_batches, step_indices, steps_per_epoch
from promptcot_engine.train.schedule import build_optimizer, build_scheduler

# settings a resumed run must share with the checkpoint for its steps to be the same steps
_RESUME_KEYS = ("objective", "num_examples", "batch_size", "epochs", "seed")


class Trainer:
    def __init__(self, model: DecoderForCausalLM, tokenizer: Tokenizer, config: TrainConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or TrainConfig()
        self.device = next(model.parameters()).device
        self.dist = distributed.init_distributed(self.device)
        self.loss_module = CausalLMLoss(model, self.config.loss_chunk_size)
        self._sharded = False

    @classmethod
    def from_pretrained(cls, model: str | Path, config: TrainConfig | None = None, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "auto") -> "Trainer":
        """Load a model (HF directory, .gguf file or packaged name) for training: fp32 master weights by
        default (bf16 compute comes from autocast on GPU), on this rank's device."""
        device = distributed.training_device() if device == "auto" else torch.device(device)
        decoder, checkpoint = load_model(model, dtype=dtype, device=device)
        return cls(decoder, checkpoint.tokenizer, config)

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self, examples, resume_from: str | os.PathLike | None = None, use_tqdm: bool = True) -> dict:
        """Train on `examples` (a JSONL path or in-memory dicts) and return the run's metrics. With
        resume_from (a checkpoint directory this trainer wrote), continue that run where it stopped."""
        cfg = self.config
        data, stats = self._load(examples)
        total_steps = cfg.epochs * steps_per_epoch(len(data), cfg.batch_size)
        state = self._read_resume_state(resume_from, len(data), total_steps) if resume_from is not None else None
        if state is not None:
            if self._sharded:
                raise InputError("resume_from: a trainer whose model is already sharded cannot load a checkpoint")
            load_checkpoint_weights(self.model, resume_from)
        start_step = state["step"] if state else 0

        requires_grad = [p.requires_grad for p in self.model.parameters()]
        was_training = self.model.training
        self.model.requires_grad_(True).train()
        if self.dist.enabled and not self._sharded:
            distributed.shard_model(self.loss_module)
            self._sharded = True
        optimizer = build_optimizer(self.loss_module, cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        if state is not None:
            distributed.load_full_optimizer_state_dict(self.loss_module, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
            set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        else:
            torch.manual_seed(cfg.seed)
        refs = None
        if cfg.objective == "dpo":
            refs = state["ref_logprobs"] if state is not None else self._reference_logprobs(data)

        log = MetricsLog(cfg.output_dir if self.dist.is_main else None, start_step if state is not None else None)
        if state is None:
            log.write("data", **stats.to_dict(), objective=cfg.objective, total_steps=total_steps)
        else:
            log.write("resume", step=start_step, checkpoint=str(resume_from))
        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.objective}", unit="step",
                   disable=not (use_tqdm and self.dist.is_main))
        history, run_start = [], time.perf_counter()
        try:
            with activation_checkpointing(self.model.model.layers, cfg.activation_checkpointing):
                for step in range(start_step, total_steps):
                    metrics = self._optimizer_step(data, step, optimizer, scheduler, refs)
                    metrics["epoch"] = round((step + 1) / (total_steps / cfg.epochs), 4)
                    history.append(metrics)
                    log.write("step", **metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    done = step + 1
                    if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                        self._save(checkpoint_path(cfg.output_dir, done), optimizer, scheduler, done, len(data), refs)
        finally:
            bar.close()
            for param, flag in zip(self.model.parameters(), requires_grad):
                param.requires_grad_(flag)
            self.model.train(was_training)
        if cfg.output_dir is not None:
            self._save(Path(cfg.output_dir), None, None, total_steps, len(data), refs)
        runtime = time.perf_counter() - run_start
        result = self._summary(history, stats, runtime)
        log.write("end", **{k: v for k, v in result.items() if k != "history"})
        return result

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under transformers' names, gathered on every rank when sharded: what the
        inference engine's load_weights takes (unsharded, this is just model.state_dict())."""
        if not self._sharded:
            return self.model.state_dict()
        return distributed.full_model_state_dict(self.loss_module, cpu_offload=False)

    # ---- one optimizer step --------------------------------------------------------------------------
    def _optimizer_step(self, data, step: int, optimizer, scheduler, refs) -> dict:
        cfg = self.config
        start = time.perf_counter()
        indices = step_indices(len(data), cfg.batch_size, cfg.seed, step)
        parts = micro_batches(indices, self.dist.rank, self.dist.world_size, cfg.grad_accum)
        lr = scheduler.get_last_lr()[0]
        if cfg.objective == "sft":
            metrics = self._sft_backward(data, indices, parts)
        else:
            metrics = self._dpo_backward(data, indices, parts, refs)
        max_norm = cfg.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.loss_module.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        tokens = sum(len(ids) for i in indices for ids, _ in data[i].sequences())
        return {"step": step + 1, **metrics, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
                "target_tokens": sum(data[i].num_targets for i in indices), "tokens_per_s": tokens / elapsed}

    def _micro_batch(self, data, part: list[int]) -> PackedBatch | None:
        """The packed micro-batch, the padding batch for an idle rank (which must still join every
        collective), or None when a lone process can simply skip an empty micro-batch."""
        if part:
            return pack([seq for i in part for seq in data[i].sequences()], self.device)
        return padding_batch(self.device) if self.dist.enabled else None

    def _backward(self, loss: torch.Tensor, is_last: bool) -> None:
        if self._sharded:
            # reduce-scatter the gradients once per step, not once per micro-batch
            self.loss_module.set_requires_gradient_sync(is_last)
        # FSDP averages gradients over ranks; the loss is already normalized over the global batch
        (loss * self.dist.world_size).backward()

    def _sft_backward(self, data: list[SFTExample], indices: list[int], parts: list[list[int]]) -> dict:
        num_targets = sum(data[i].num_targets for i in indices)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, part in enumerate(parts):
            batch = self._micro_batch(data, part)
            if batch is None:
                continue
            with self._autocast():
                token_loss_sum = self.loss_module(batch, "sum")
            self._backward(token_loss_sum / num_targets, k == len(parts) - 1)
            loss_sum += token_loss_sum.detach()
        distributed.all_reduce_sum(loss_sum, self.dist)
        return {"loss": loss_sum.item() / num_targets}

    def _dpo_backward(self, data: list[PreferenceExample], indices: list[int], parts: list[list[int]], refs) -> dict:
        beta, num_pairs = self.config.dpo_beta, len(indices)
        # summed over the step: loss, reward margin, correctly ordered pairs, chosen and rejected rewards
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        for k, part in enumerate(parts):
            batch = self._micro_batch(data, part)
            if batch is None:
                continue
            if not part:  # padding: a zero loss through the whole model keeps the ranks' collectives in step
                with self._autocast():
                    self._backward(self.loss_module(batch, "sum") * 0.0, k == len(parts) - 1)
                continue
            with self._autocast():
                token_losses = self.loss_module(batch, "none")
            logps = sequence_logprobs(token_losses, batch)
            ref = torch.tensor([refs[i] for i in part], dtype=logps.dtype, device=self.device)
            chosen_rewards = beta * (logps[0::2] - ref[:, 0])
            rejected_rewards = beta * (logps[1::2] - ref[:, 1])
            margins = chosen_rewards - rejected_rewards
            losses = -F.logsigmoid(margins)
            self._backward(losses.sum() / num_pairs, k == len(parts) - 1)
            totals += torch.stack([losses.sum(), margins.sum(), (margins > 0).sum(), chosen_rewards.sum(),
                                   rejected_rewards.sum()]).detach().double()
        distributed.all_reduce_sum(totals, self.dist)
        loss, margin, correct, chosen, rejected = (totals / num_pairs).tolist()
        return {"loss": loss, "reward_margin": margin, "accuracy": correct, "chosen_reward": chosen,
                "rejected_reward": rejected}

    @torch.no_grad()
    def _reference_logprobs(self, data: list[PreferenceExample]) -> list[tuple[float, float]]:
        """(chosen, rejected) log-prob sums under the model as it is before training: the frozen
        reference, computed once instead of keeping a copy of the model. Records that carry them keep
        theirs. The work is spread over the ranks in rounds of one micro-batch each."""
        cfg = self.config
        refs = [(ex.ref_chosen_logprob, ex.ref_rejected_logprob) for ex in data]
        missing = [i for i, ex in enumerate(data) if ex.ref_chosen_logprob is None]
        per_micro_batch = max(1, math.ceil(cfg.batch_size / (self.dist.world_size * cfg.grad_accum)))
        chunks = [missing[k:k + per_micro_batch] for k in range(0, len(missing), per_micro_batch)]
        mine = chunks[self.dist.rank::self.dist.world_size]
        computed = {}
        for round_ in range(math.ceil(len(chunks) / self.dist.world_size)):
            part = mine[round_] if round_ < len(mine) else []
            batch = self._micro_batch(data, part)
            if batch is None:
                continue
            with self._autocast():
                token_losses = self.loss_module(batch, "none")
            if part:
                logps = sequence_logprobs(token_losses, batch).tolist()
                computed.update({i: (logps[2 * j], logps[2 * j + 1]) for j, i in enumerate(part)})
        for gathered in distributed.all_gather_objects(computed, self.dist):
            for i, pair in gathered.items():
                refs[i] = pair
        return refs

    # ---- helpers -------------------------------------------------------------------------------------
    def _load(self, examples):
        cfg = self.config
        records = read_records(examples)
        tokenize = tokenize_sft if cfg.objective == "sft" else tokenize_preferences
        data, stats = tokenize(records, self.tokenizer, cfg.max_length, cfg.truncation)
        if not data:
            why = (f", {stats.skipped_too_long} longer than max_length={cfg.max_length}, the first at {stats.first_skipped}"
                   if stats.skipped_too_long else "")
            raise InputError(f"no examples to train on ({stats.records} records{why})")
        vocab_size = self.model.config.vocab_size
        for example in data:
            if max(token for ids, _ in example.sequences() for token in ids) >= vocab_size:
                raise InputError(f"{example.source}: token ids reach beyond the model's vocabulary ({vocab_size}); "
                                 "the tokenizer does not belong to this model")
        return data, stats

    def _read_resume_state(self, resume_from, num_examples: int, total_steps: int) -> dict:
        state = read_training_state(resume_from)
        run = {"objective": self.config.objective, "num_examples": num_examples, "batch_size": self.config.batch_size,
               "epochs": self.config.epochs, "seed": self.config.seed}
        for key in _RESUME_KEYS:
            if state.get(key) != run[key]:
                raise InputError(f"{resume_from}: checkpoint was written with {key}={state.get(key)!r}, this run has "
                                 f"{key}={run[key]!r}; a resumed run must see the same data and settings")
        if not 0 < state["step"] <= total_steps:
            raise InputError(f"{resume_from}: checkpoint step {state['step']} is outside this run's {total_steps} steps")
        return state

    def _save(self, directory: Path, optimizer, scheduler, step: int, num_examples: int, refs) -> None:
        """A checkpoint (with optimizer) or the final model (without). Every rank joins the gathers;
        rank 0 writes."""
        cfg = self.config
        state_dict = distributed.full_model_state_dict(self.loss_module, cpu_offload=True) if self._sharded \
            else {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
        training_state = None
        if optimizer is not None:
            training_state = {
                "step": step, "objective": cfg.objective, "num_examples": num_examples, "batch_size": cfg.batch_size,
                "epochs": cfg.epochs, "seed": cfg.seed, "world_size": self.dist.world_size, "config": cfg.to_dict(),
                "optimizer": distributed.full_optimizer_state_dict(self.loss_module, optimizer),
                "scheduler": scheduler.state_dict(),
                "rng": distributed.all_gather_objects(rng_state(), self.dist),
                "ref_logprobs": refs,
            }
        if self.dist.is_main:
            if optimizer is None:
                write_model(directory, self.model, state_dict, self.tokenizer)
            else:
                write_checkpoint(directory, self.model, state_dict, self.tokenizer, training_state)
        distributed.barrier(self.dist)

    def _autocast(self):
        bf16 = self.config.bf16
        if bf16 is None:
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _summary(self, history: list[dict], stats, runtime: float) -> dict:
        tokens = sum(m["tokens"] for m in history)
        result = {"steps": len(history), "step": history[-1]["step"] if history else None,
                  "loss": history[-1]["loss"] if history else None,
                  "mean_loss": sum(m["loss"] for m in history) / len(history) if history else None,
                  "tokens": tokens, "runtime_s": runtime, "tokens_per_s": tokens / runtime if runtime else 0.0,
                  **stats.to_dict()}
        if self.config.objective == "dpo" and history:
            result.update(reward_margin=history[-1]["reward_margin"], accuracy=history[-1]["accuracy"])
        result["history"] = history
        return result
