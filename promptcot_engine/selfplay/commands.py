"""CLI: promptcot selfplay rollouts | verify | pairs (self-play DPO data) and promptcot sft-data
(teacher-distilled SFT data). JSONL in, JSONL out; every input is read and checked before a model loads,
and every output is written atomically."""
from __future__ import annotations

from pathlib import Path

import click

from promptcot_engine.engine.commands import engine_options, make_llm
from promptcot_engine.errors import InputError

_INPUT = click.Path(dir_okay=False, path_type=Path)
_OUTPUT = click.Path(dir_okay=False, path_type=Path)


@click.group()
def selfplay():
    """Self-play DPO data: sample rollouts from the policy, verify them, build chosen/rejected pairs."""


@selfplay.command()
@engine_options
@click.option("--input", "input_path", required=True, type=_INPUT,
              help='Problems JSONL: {"id"?, "problem", "answer"?, "domain"? ("math" | "code")}, or "champ".')
@click.option("--output", required=True, type=_OUTPUT, help="Rollouts JSONL: each problem with its prompt and rollouts.")
@click.option("--n", default=8, show_default=True, type=click.IntRange(min=1), help="Rollouts per problem.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--max-tokens", default=4096, show_default=True, help="Tokens per rollout.")
@click.option("--seed", default=0, show_default=True, help="Problem i is sampled with request seed SEED + i.")
def rollouts(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, output, n, temperature, top_p, max_tokens,
             seed):
    """Sample N solutions per problem from the policy --model, prompted with its chat template."""
    from promptcot_engine.jsonl import write_jsonl
    from promptcot_engine.selfplay.rollouts import generate_rollouts, read_problems

    problems = read_problems(input_path)
    llm = make_llm(model, dtype, device, max_num_seqs, kv_cache_gb)
    records = generate_rollouts(llm, problems, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=seed)
    write_jsonl(output, records)
    cut = sum(r["finish_reason"] == "length" for record in records for r in record["rollouts"])
    click.echo(f"wrote {len(records)} problems x {n} rollouts to {output} ({cut} cut at --max-tokens)", err=True)


@selfplay.command()
@engine_options
@click.option("--input", "input_path", required=True, type=_INPUT, help="Rollouts JSONL from `selfplay rollouts`.")
@click.option("--output", required=True, type=_OUTPUT, help="Verified JSONL: every rollout marked passed or not.")
@click.option("--tests-per-problem", default=4, show_default=True, type=click.IntRange(min=1),
              help="Teacher calls per code problem, each asked for one unit test.")
@click.option("--test-temperature", default=1.0, show_default=True)
@click.option("--test-max-tokens", default=1024, show_default=True, help="Tokens per teacher answer.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per program run and per answer comparison.")
@click.option("--memory-mb", default=512, show_default=True, type=click.IntRange(min=16), help="Memory per program run.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Problems verified at once (default: CPUs).")
@click.option("--seed", default=0, show_default=True, help="Code problem i's tests are sampled with seed SEED + i.")
def verify(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, output, tests_per_problem, test_temperature,
           test_max_tokens, timeout, memory_mb, workers, seed):
    """Mark each rollout passed or failed. Math: the last \\boxed{} against "answer" (or the majority vote of the
    rollouts). Code: the program run in the sandbox on unit tests written by the teacher --model (loaded only
    when there are code problems), one test per call; the teacher's expected outputs are trusted."""
    from promptcot_engine.jsonl import write_jsonl
    from promptcot_engine.selfplay.pairs import verify_rollouts
    from promptcot_engine.selfplay.rollouts import generate_unit_tests, read_rollouts

    records = read_rollouts(input_path)
    code = [r for r in records if r["domain"] == "code"]
    tests_by_id = {}
    if code:
        teacher = make_llm(model, dtype, device, max_num_seqs, kv_cache_gb)
        tests = generate_unit_tests(teacher, [r["problem"] for r in code], num_calls=tests_per_problem,
                                    temperature=test_temperature, max_tokens=test_max_tokens, seed=seed)
        tests_by_id = {r["id"]: t for r, t in zip(code, tests)}
        del teacher  # its weights and KV cache are not needed by the sandbox runs
    verified, stats = verify_rollouts(records, tests_by_id, timeout=timeout, memory_mb=memory_mb, workers=workers)
    write_jsonl(output, verified)
    click.echo(f"wrote {stats['problems']} problems to {output}: {stats['passed']} of {stats['rollouts']} rollouts "
               f"passed; {stats['code_problems_without_tests']} code problems without usable tests, "
               f"{stats['math_problems_without_reference']} math problems without a reference answer", err=True)


@selfplay.command()
@engine_options
@click.option("--input", "input_path", required=True, type=_INPUT, help="Verified JSONL from `selfplay verify`.")
@click.option("--output", required=True, type=_OUTPUT, help='DPO JSONL: {"prompt", "chosen", "rejected", ...}.')
@click.option("--ref-logprobs/--no-ref-logprobs", default=False, show_default=True,
              help="Add ref_chosen_logprob / ref_rejected_logprob computed with --model (the reference policy, "
                   "normally the one that wrote the rollouts), so `promptcot train --objective dpo` skips that pass.")
def pairs(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, output, ref_logprobs):
    """Drop problems solved in none or at least half of their rollouts; pair passing (chosen) with failing
    (rejected) rollouts, min(passing, failing) pairs per problem."""
    from promptcot_engine.jsonl import write_jsonl
    from promptcot_engine.selfplay.pairs import add_reference_logprobs, build_pairs
    from promptcot_engine.selfplay.rollouts import read_rollouts

    dpo_pairs, stats = build_pairs(read_rollouts(input_path, verified=True))
    if ref_logprobs and dpo_pairs:
        dpo_pairs = add_reference_logprobs(make_llm(model, dtype, device, max_num_seqs, kv_cache_gb), dpo_pairs)
    write_jsonl(output, dpo_pairs)
    click.echo(f"wrote {stats['pairs']} pairs from {stats['kept']} of {stats['problems']} problems to {output} "
               f"(dropped: {stats['dropped_none_solved']} solved by no rollout, {stats['dropped_half_or_more_solved']} "
               "by at least half)", err=True)


@click.command(name="sft-data")
@engine_options
@click.option("--input", "input_path", required=True, type=_INPUT,
              help='Problems JSONL: {"id"?, "problem", "answer"?, "domain"? ("math" | "code")}, or "champ".')
@click.option("--output", required=True, type=_OUTPUT, help='SFT JSONL: {"id", "domain", "prompt", "completion"}.')
@click.option("--max-trace-tokens", default=16384, show_default=True, type=click.IntRange(min=1),
              help="Longest trace kept, in the teacher's tokens.")
@click.option("--temperature", default=0.6, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Problem i is sampled with request seed SEED + i.")
@click.option("--student", default=None,
              help="Render each prompt with this model's chat template (default: the plain request text).")
def sft_data(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, output, max_trace_tokens, temperature,
             top_p, seed, student):
    """Teacher distillation: the teacher --model writes one solution trace per problem; traces with a final
    answer (\\boxed{} for math, a ```python block for code) within --max-trace-tokens are kept."""
    from promptcot_engine.jsonl import write_jsonl
    from promptcot_engine.models.loader import open_checkpoint
    from promptcot_engine.selfplay.rollouts import read_problems
    from promptcot_engine.selfplay.sft_data import build_sft_data

    problems = read_problems(input_path)
    student_tokenizer = open_checkpoint(student).tokenizer if student else None
    if student_tokenizer is not None and not student_tokenizer.chat_template:
        raise InputError(f"--student {student}: the checkpoint has no chat template")
    teacher = make_llm(model, dtype, device, max_num_seqs, kv_cache_gb)
    records, stats = build_sft_data(teacher, problems, max_trace_tokens=max_trace_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, student_tokenizer=student_tokenizer)
    write_jsonl(output, records)
    dropped = stats["dropped"]
    click.echo(f"wrote {stats['kept']} of {stats['problems']} traces to {output} (dropped: {dropped['too_long']} "
               f"over --max-trace-tokens, {dropped['no_final_answer']} without a final answer)", err=True)
