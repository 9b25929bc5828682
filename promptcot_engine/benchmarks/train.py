"""Training benchmark: one batch, the same AdamW steps, through transformers (its forward with labels:
cross-entropy over the full [tokens, vocab] logits) and through the engine's Trainer (packed sequences,
fused linear cross-entropy, selective activation checkpointing by default), each side in its own
subprocess. Memory is the process's peak resident set while training (VmHWM, reset once the model is
loaded; torch's CPU allocations are invisible to tracemalloc). Prints tokens/s, model GFLOP/s and peak
memory of both and the ratios; `run_train_bench` returns them for `promptcot bench train`.

    promptcot bench train [--model M] [--batch 8] [--seq-len 512] [--steps 3]
    python -m promptcot_engine.benchmarks.train [the same] [--grad-accum 1]
                                [--activation-checkpointing selective|none|full]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from promptcot_engine.benchmarks.common import reset_peak_rss, run_side, status_mb

LR = 1e-5


def run_train_bench(model: str = "smollm2-135m-instruct", batch: int = 8, seq_len: int = 512, steps: int = 3,
                    grad_accum: int = 1, activation_checkpointing: str = "selective", device: str = "cpu") -> dict:
    """Both sides on `batch` sequences of `seq_len` tokens for `steps` optimizer steps. tokens/s is the
    median over the steps after the first (which pays for first-touch allocations)."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        hf_dir = _as_hf_dir(model, Path(tmp))
        flops_per_token = _train_flops_per_token(json.loads((hf_dir / "config.json").read_text()), seq_len)
        common = ["--hf-dir", str(hf_dir), "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps),
                  "--device", device]
        reference = run_side("promptcot_engine.benchmarks.train", "transformers", common)
        engine = run_side("promptcot_engine.benchmarks.train", "engine", common + ["--grad-accum", str(grad_accum),
                                               "--activation-checkpointing", activation_checkpointing])
    return {
        "model": model, "batch": batch, "seq_len": seq_len, "steps": steps, "grad_accum": grad_accum,
        "activation_checkpointing": activation_checkpointing, "device": device,
        "transformers_tokens_per_s": reference["tokens_per_s"], "engine_tokens_per_s": engine["tokens_per_s"],
        "transformers_gflops": reference["tokens_per_s"] * flops_per_token / 1e9,
        "engine_gflops": engine["tokens_per_s"] * flops_per_token / 1e9,
        "transformers_peak_rss_mb": reference["peak_rss_mb"], "engine_peak_rss_mb": engine["peak_rss_mb"],
        "transformers_rss_after_load_mb": reference["rss_after_load_mb"],
        "engine_rss_after_load_mb": engine["rss_after_load_mb"],
        "transformers_first_loss": reference["first_loss"], "engine_first_loss": engine["first_loss"],
        "tokens_per_s_ratio": engine["tokens_per_s"] / reference["tokens_per_s"],
        "peak_memory_ratio": engine["peak_rss_mb"] / reference["peak_rss_mb"],
        # the machine's 1-minute load before and after: timings on a shared machine are only as good as this
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
    }


def _as_hf_dir(model: str, tmp: Path) -> Path:
    """transformers needs an HF directory: use the model if it is one, else convert it with the engine."""
    if (Path(model) / "config.json").is_file():
        return Path(model)
    out = tmp / "hf"
    subprocess.run([sys.executable, "-m", "promptcot_engine.cli", "convert", "--model", model, "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def bench_records(tokenizer, batch: int, seq_len: int) -> list[dict]:
    """`batch` completions of at least seq_len tokens (random vocabulary ids decoded to text, seeded),
    cut to seq_len tokens by the trainer's truncation; the prompt is empty so every token is a target."""
    import torch

    g = torch.Generator().manual_seed(0)
    low = min(1000, len(tokenizer) // 4)  # clear of the special tokens at the start of the vocabulary
    return [{"prompt": "", "completion": tokenizer.decode(torch.randint(low, len(tokenizer), (2 * seq_len,), generator=g).tolist())}
            for _ in range(batch)]


def _train_flops_per_token(config: dict, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6 per weight of every matrix product (forward 2, backward 4),
    the LM head included, plus causal attention's scores and weighted sum (half of 12 * L * d * seq)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * config["intermediate_size"]
    matmul_weights = layers * per_layer + h * config["vocab_size"]
    return 6 * matmul_weights + 6 * layers * heads * head_dim * seq_len


def _engine_side(hf_dir: str, batch: int, seq_len: int, steps: int, grad_accum: int, activation_checkpointing: str,
                 device: str) -> dict:
    from promptcot_engine.train import TrainConfig, Trainer

    config = TrainConfig(lr=LR, epochs=steps, batch_size=batch, grad_accum=grad_accum, max_length=seq_len,
                         lr_schedule="constant", max_grad_norm=1.0, activation_checkpointing=activation_checkpointing)
    trainer = Trainer.from_pretrained(hf_dir, config, device=device)
    records = bench_records(trainer.tokenizer, batch, seq_len)
    rss_after_load = reset_peak_rss()
    result = trainer.train(records, use_tqdm=False)
    history = result["history"]
    assert all(m["tokens"] == batch * seq_len for m in history), "every example must be cut to seq_len tokens"
    return {"tokens_per_s": _median([m["tokens_per_s"] for m in history[1:] or history]),
            "first_loss": history[0]["loss"], "rss_after_load_mb": rss_after_load, "peak_rss_mb": status_mb("VmHWM")}


def _transformers_side(hf_dir: str, batch: int, seq_len: int, steps: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from promptcot_engine.models.tokenizer import Tokenizer
    from promptcot_engine.train.data import read_records, tokenize_sft

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).train()
    tokenizer = Tokenizer.from_dir(hf_dir)
    # the very token ids the trainer trains on
    examples, _ = tokenize_sft(read_records(bench_records(tokenizer, batch, seq_len)), tokenizer, seq_len, "truncate")
    input_ids = torch.tensor([e.input_ids for e in examples], device=device)
    labels = torch.tensor([e.labels for e in examples], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    rss_after_load = reset_peak_rss()
    rates, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(batch * seq_len / (time.perf_counter() - start))
        losses.append(loss.item())
    return {"tokens_per_s": _median(rates[1:] or rates), "first_loss": losses[0], "rss_after_load_mb": rss_after_load,
            "peak_rss_mb": status_mb("VmHWM")}


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["transformers", "engine"])
    parser.add_argument("--hf-dir")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="selective")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.side == "engine":
        result = _engine_side(args.hf_dir, args.batch, args.seq_len, args.steps, args.grad_accum,
                              args.activation_checkpointing, args.device)
    elif args.side == "transformers":
        result = _transformers_side(args.hf_dir, args.batch, args.seq_len, args.steps, args.device)
    else:
        result = run_train_bench(args.model, args.batch, args.seq_len, args.steps, args.grad_accum,
                                 args.activation_checkpointing, args.device)
        for key, value in result.items():
            print(f"{key:>32}: {value:,.3f}" if isinstance(value, float) else f"{key:>32}: {value}")
        return
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
