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


@click.group()
def bench():
    """Benchmarks: the same work through a reference and through the engine, with the ratio."""


@bench.command("generate")
@click.option("--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--num-prompts", default=16, show_default=True)
@click.option("--n", default=8, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--compare", type=click.Choice(["hf", "none"]), default="hf", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--output", type=click.Path(path_type=Path), help="Append the result as a JSON line here.")
def bench_generate(model, num_prompts, n, max_tokens, temperature, compare, device, dtype, output):
    """Sampling throughput: engine vs transformers' generate."""
    from promptcot_engine.benchmarks.generate import run_generate_bench

    result = run_generate_bench(model, num_prompts, n, max_tokens, temperature, compare == "hf", device, dtype)
    _emit("generate", result, output)
