"""CLI: promptcot bench generate | score | train | estep."""
from __future__ import annotations

import json
from pathlib import Path

import click

from promptcot_engine.benchmarks.common import report


def _emit(name: str, result: dict, output: Path | None) -> None:
    click.echo(report(name, result))
    if output:
        with output.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"bench": name, **result}, default=str) + "\n")


def _options(compare: str | None = "hf", device: str = "auto", model_help: str | None = None, dtype: bool = True):
    """The options every benchmark shares: the model, the reference to compare with, device, dtype, output."""
    options = [click.option("--model", default="smollm2-135m-instruct", show_default=True, help=model_help)]
    if compare is not None:
        options.append(click.option("--compare", type=click.Choice(["hf", "none"]), default=compare, show_default=True))
    options.append(click.option("--device", default=device, show_default=True))
    if dtype:
        options.append(click.option("--dtype", default="auto", show_default=True))
    options.append(click.option("--output", type=click.Path(path_type=Path),
                                help="Append the result as a JSON line here."))

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


@click.group()
def bench():
    """Benchmarks: the same work through a reference and through the engine, with the ratio."""


@bench.command("generate")
@_options()
@click.option("--num-prompts", default=16, show_default=True)
@click.option("--n", default=8, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seeded", is_flag=True, help="A seed per request, as the E-step and synthesis sample.")
def bench_generate(model, num_prompts, n, max_tokens, temperature, seeded, compare, device, dtype, output):
    """Sampling throughput: engine vs transformers' generate."""
    from promptcot_engine.benchmarks.generate import run_generate_bench

    result = run_generate_bench(model, num_prompts, n, max_tokens, temperature, compare == "hf", device, dtype, seeded)
    _emit("generate", result, output)


@bench.command("train")
@_options(compare=None, device="cpu", dtype=False)
@click.option("--batch", default=8, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--steps", default=3, show_default=True)
@click.option("--activation-checkpointing", type=click.Choice(["none", "selective", "full"]), default="selective",
              show_default=True)
def bench_train(model, batch, seq_len, steps, activation_checkpointing, device, output):
    """Training step: transformers (full-logits cross-entropy) vs the Trainer, tokens/s and peak memory."""
    from promptcot_engine.benchmarks.train import run_train_bench

    result = run_train_bench(model, batch, seq_len, steps, activation_checkpointing=activation_checkpointing, device=device)
    _emit("train", result, output)


@bench.command("score")
@_options()
@click.option("--num-pairs", default=64, show_default=True)
@click.option("--pairs-per-context", default=8, show_default=True)
@click.option("--context-len", default=512, show_default=True)
@click.option("--continuation-len", default=512, show_default=True)
def bench_score(model, num_pairs, pairs_per_context, context_len, continuation_len, compare, device, dtype, output):
    """Teacher-forced scoring: engine vs transformers forward + log_softmax, throughput and peak memory."""
    from promptcot_engine.benchmarks.score import run_score_bench

    result = run_score_bench(model, num_pairs, pairs_per_context, context_len, continuation_len, device, dtype,
                             compare == "hf")
    result.pop("logprob_sums", None)
    _emit("score", result, output)


@bench.command("estep")
@_options(compare="none", model_help="Used as both q and p.")
@click.option("--num-pairs", default=16, show_default=True, help="Seed pairs (c, x), from CHAMP.")
@click.option("--k", default=8, show_default=True, help="Rationales per pair.")
@click.option("--max-tokens", default=256, show_default=True, help="Rationale length cap.")
def bench_estep(model, num_pairs, k, max_tokens, compare, device, dtype, output):
    """One E-step (sample K rationales per pair from q, score them under p): pairs/s, tokens/s, memory."""
    from promptcot_engine.benchmarks.estep import run_estep_bench

    _emit("estep", run_estep_bench(model, num_pairs, k, max_tokens, device, dtype, compare == "hf"), output)
