"""CLI: the PromptCoT loop's stages (promptcot dedup)."""
from __future__ import annotations

from pathlib import Path

import click

from promptcot_engine.errors import InputError


@click.command()
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file of records to deduplicate.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file to write the kept records to (written atomically).")
@click.option("--key", default="problem", show_default=True, help="Field holding the text to compare.")
def dedup(input_path: Path, output: Path, key: str):
    """Drop exact, then near duplicate records (MinHash LSH confirmed by word-set Jaccard > 0.2); the first
    occurrence wins."""
    from promptcot_engine.em.dedup import dedup as drop_duplicates
    from promptcot_engine.jsonl import iter_jsonl, write_jsonl

    records = []
    for line_number, record in iter_jsonl(input_path):
        if key not in record:
            raise InputError(f"{input_path}:{line_number}: missing field {key!r}")
        if not isinstance(record[key], str):
            kind = type(record[key]).__name__
            raise InputError(f"{input_path}:{line_number}: field {key!r} must be a string, got {kind}")
        records.append(record)
    kept, stats = drop_duplicates(records, key=key)
    write_jsonl(output, kept)
    click.echo(
        f"read {stats['input']}, dropped {stats['exact_duplicates']} exact and {stats['near_duplicates']} near "
        f"duplicates, wrote {stats['kept']} to {output}"
    )


def _em_options(f):
    """Settings shared by `em` and the stage commands (each stage uses the ones it needs)."""
    for decorator in reversed([
        click.option("--max-tokens", type=int, help="New tokens for teacher answers and rationales."),
        click.option("--seed", type=int, help="Base seed; every record's sampling seed derives from it."),
        click.option("--dtype", help="auto, float32, bfloat16 or float16."),
        click.option("--device", help="auto, cpu, cuda or cuda:N."),
        click.option("--kv-cache-gb", type=float, help="KV cache budget of each engine."),
        click.option("--gpu-memory-utilization", type=float, help="Each engine's share of the GPU (default 0.3)."),
    ]):
        f = decorator(f)
    return f


def _config(config_path=None, **flags):
    from promptcot_engine.em.config import EMConfig

    return EMConfig.load(config_path, **flags)


def _limit_threads_per_rank() -> None:
    """Under torchrun on CPU each rank gets its share of the cores, not all of them."""
    import os

    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="TOML settings file.")
@click.option("--model", help="Initial checkpoint of q and p (HF dir, .gguf, or packaged name).")
@click.option("--teacher", help="Cold-start annotator (default: --model).")
@click.option("--seeds", help="'champ' or a JSONL of seed problems.")
@click.option("--num-seeds", type=int, help="Use the first N seeds.")
@click.option("--k", type=int, help="Rationales per (c, x) in the E-step.")
@click.option("--iterations", type=int, help="EM iterations.")
@click.option("--num-problems", type=int, help="Concept sets sent to the prompt model in synthesis.")
@click.option("--run-dir", help="Run directory (rerunning the same command resumes it).")
@click.option("--synthesis-max-tokens", type=int, help="New tokens per synthesized output.")
@click.option("--batch-size", type=int, help="SFT batch size.")
@_em_options
def em(config_path, **flags):
    """Run the PromptCoT 2.0 EM loop: cold start, E-step, M-step, synthesis, dedup."""
    from promptcot_engine.em.loop import format_summary, run_em

    _limit_threads_per_rank()
    config = _config(config_path, **flags)
    summary = run_em(config, log=lambda message: click.echo(message, err=True))
    if summary is not None:
        click.echo(format_summary(summary))


@click.command()
@click.option("--teacher", default="smollm2-135m-instruct", show_default=True)
@click.option("--seeds", default="champ", show_default=True, help="'champ' or a JSONL of seed problems.")
@click.option("--num-seeds", type=int)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--num-concepts", type=int)
@_em_options
def annotate(teacher, seeds, num_seeds, output, num_concepts, **flags):
    """Cold-start annotation: concepts, level and rationale for each seed, from a teacher model."""
    from promptcot_engine.em.annotate import annotate_seeds
    from promptcot_engine.em.seeds import load_seeds
    from promptcot_engine.em.sharding import Sharding
    from promptcot_engine.jsonl import write_jsonl

    _limit_threads_per_rank()
    config = _config(teacher=teacher, seeds=seeds, num_seeds=num_seeds, num_concepts=num_concepts, **flags)
    seed_records = load_seeds(config.seeds, config.num_seeds)
    llm = config.make_llm(config.teacher_model)
    sharding = Sharding(llm.engine.device)
    triples = sharding.map_chunks(lambda chunk: annotate_seeds(llm, chunk, config), seed_records, config.chunk_size,
                                  "annotate")
    if sharding.is_main:
        write_jsonl(output, triples)
        click.echo(f"annotated {len(triples)} of {len(seed_records)} seeds into {output}", err=True)


@click.command()
@click.option("--rationale-model", required=True, help="q: samples the rationales.")
@click.option("--prompt-model", required=True, help="p: scores them.")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Triples JSONL (id, problem, concepts, level, domain, rationale).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Every candidate.")
@click.option("--winners", type=click.Path(dir_okay=False, path_type=Path), help="The argmax of each pair.")
@click.option("--k", type=int)
@click.option("--iteration", default=1, show_default=True, help="Iteration number (part of the sampling seeds).")
@_em_options
def estep(rationale_model, prompt_model, input_path, output, winners, k, iteration, **flags):
    """E-step: K rationales per (c, x) from q, rewarded by log p(z|c) + log p(x|z,c) under p."""
    from promptcot_engine.em.estep import sample_and_score, select_winners
    from promptcot_engine.em.sharding import Sharding
    from promptcot_engine.em.triples import read_triples
    from promptcot_engine.jsonl import write_jsonl

    _limit_threads_per_rank()
    triples = read_triples(input_path, need_rationale=True)
    config = _config(k=k, **flags)
    q, p = config.make_llm(rationale_model), config.make_llm(prompt_model)
    sharding = Sharding(q.engine.device)
    candidates = sharding.map_chunks(lambda chunk: sample_and_score(q, p, chunk, config, iteration), triples,
                                     config.chunk_size, "estep")
    if sharding.is_main:
        write_jsonl(output, candidates)
        if winners:
            write_jsonl(winners, select_winners(triples, candidates)[0])
        click.echo(f"{len(candidates)} candidates for {len(triples)} pairs into {output}", err=True)


@click.command()
@click.option("--rationale-model", required=True, help="q: decodes the rationales greedily.")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--iteration", default=1, show_default=True)
@_em_options
def mstep(rationale_model, input_path, output, iteration, **flags):
    """M-step data: one greedy rationale per (c, x) from q (then `promptcot train` p on c -> (z, x))."""
    from promptcot_engine.em.mstep import greedy_rationales
    from promptcot_engine.em.sharding import Sharding
    from promptcot_engine.em.triples import read_triples
    from promptcot_engine.jsonl import write_jsonl

    _limit_threads_per_rank()
    triples = read_triples(input_path, need_rationale=True)
    config = _config(**flags)
    q = config.make_llm(rationale_model)
    sharding = Sharding(q.engine.device)
    records = sharding.map_chunks(lambda chunk: greedy_rationales(q, chunk, config, iteration), triples,
                                  config.chunk_size, "mstep")
    if sharding.is_main:
        write_jsonl(output, records)
        click.echo(f"{len(records)} rationales into {output}", err=True)


@click.command()
@click.option("--prompt-model", required=True, help="p: writes rationale + problem for each concept set.")
@click.option("--concepts-from", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Annotated triples JSONL: the concept pool.")
@click.option("--num-problems", type=int, default=100, show_default=True)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Parsed problems (outputs without both marker pairs are dropped and counted).")
@click.option("--synthesis-max-tokens", type=int)
@_em_options
def synthesize(prompt_model, concepts_from, num_problems, output, synthesis_max_tokens, **flags):
    """Sample problems from p for concept sets drawn from the annotated pool (run `promptcot dedup` after)."""
    from promptcot_engine.em.concept_sampling import sample_concept_sets
    from promptcot_engine.em.sharding import Sharding
    from promptcot_engine.em.synthesize import final_problem, generate_problems, synthesis_requests
    from promptcot_engine.em.triples import read_triples
    from promptcot_engine.jsonl import write_jsonl

    _limit_threads_per_rank()
    triples = read_triples(concepts_from, need_rationale=False)
    config = _config(num_problems=num_problems, synthesis_max_tokens=synthesis_max_tokens, **flags)
    p = config.make_llm(prompt_model)
    sharding = Sharding(p.engine.device)
    requests = synthesis_requests(sample_concept_sets(triples, config.num_problems, config.seed, config.num_concepts))
    outputs = sharding.map_chunks(lambda chunk: generate_problems(p, chunk, config, 0), requests, config.chunk_size,
                                  "synthesize")
    if sharding.is_main:
        valid = [final_problem(o) for o in outputs if o["valid"]]
        write_jsonl(output, valid)
        click.echo(f"{len(valid)} of {len(outputs)} outputs had both marker pairs; wrote {output}", err=True)
