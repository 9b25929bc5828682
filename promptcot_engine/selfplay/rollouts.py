"""What the engine generates for self-play: the policy's rollouts and the teacher's unit tests.

A problem is {"id", "problem", "answer" (str | None), "domain" ("math" | "code")}, read with the seed
loader's checks (a missing id becomes "<file stem>/<line>"). A rollout record is the problem plus
"prompt" (the policy's chat-templated prompt, the exact text the DPO trainer will see again) and
"rollouts": [{"text", "finish_reason", "num_tokens"}], one entry per sample.

Seeds: problem i is sampled with the request seed `seed + i` (the engine derives one random stream per
sample from it), so a run is reproducible whatever the batch composition.
"""
from __future__ import annotations

import os

from promptcot_engine.em.seeds import load_seeds
from promptcot_engine.em.templates import DOMAINS
from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import iter_jsonl
from promptcot_engine.sampling_params import SamplingParams
from promptcot_engine.selfplay.code import outputs_match
from promptcot_engine.selfplay.unit_tests import parse_unit_test

FINISH_REASONS = ("stop", "length")

_MATH_INSTRUCTION = (
    "Solve the following math problem. Reason step by step, then write the final answer alone "
    "inside \\boxed{{}}.\n\n{problem}"
)
_CODE_INSTRUCTION = (
    "Solve the following programming problem in Python 3. Reason about it, then give the complete program "
    "in a single ```python code block. The program must read its input from standard input and write its "
    "answer to standard output.\n\n{problem}"
)
_UNIT_TEST_INSTRUCTION = (
    "Write one test case for the programming problem below: an input exactly as a program would read it "
    "from standard input, and the exact output a correct program prints for that input. Answer with a "
    'single JSON object and nothing else: {{"input": "...", "output": "..."}}\n\nProblem:\n{problem}'
)


def solution_request(problem: str, domain: str) -> str:
    """The user message asking for a solution: a final answer in \\boxed{} (math) or one ```python
    block that reads stdin (code). The teacher of `sft-data` gets the same request as the policy."""
    if domain not in DOMAINS:
        raise InputError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    return (_CODE_INSTRUCTION if domain == "code" else _MATH_INSTRUCTION).format(problem=problem.strip())


def policy_prompt(tokenizer, problem: str, domain: str) -> str:
    """The solution request rendered as one user turn with the model's chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": solution_request(problem, domain)}])


def read_problems(path: str | os.PathLike) -> list[dict]:
    """{"id", "problem", "answer", "domain"} per line of a problems JSONL file ("champ" names the packaged
    CHAMP problems); file:line errors for a bad field, a duplicate id or an empty file."""
    return [{key: seed[key] for key in ("id", "problem", "answer", "domain")} for seed in load_seeds(str(path))]


def generate_rollouts(llm, problems: list[dict], n: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                      max_tokens: int = 4096, seed: int = 0, use_tqdm: bool = True) -> list[dict]:
    """`n` sampled solutions per problem from the policy `llm`."""
    prompts = [policy_prompt(llm.tokenizer, p["problem"], p["domain"]) for p in problems]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(problems))]
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    return [{**problem, "prompt": prompt,
             "rollouts": [{"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                          for c in output.outputs]}
            for problem, prompt, output in zip(problems, prompts, outputs)]


def read_rollouts(path: str | os.PathLike, verified: bool = False) -> list[dict]:
    """Rollout records written by `generate_rollouts` (and, with verified=True, marked by the verify
    stage: every rollout has a boolean "passed"), checked field by field with file:line errors."""
    records, first_line_of = [], {}
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        for field in ("id", "problem", "prompt"):
            if not isinstance(record.get(field), str):
                raise InputError(f"{where}: field {field!r} must be a string")
        if record["id"] in first_line_of:
            raise InputError(f"{where}: duplicate id {record['id']!r} (first on line {first_line_of[record['id']]})")
        first_line_of[record["id"]] = line
        if record.get("domain", "math") not in DOMAINS:
            raise InputError(f"{where}: field 'domain' must be one of {DOMAINS}, got {record['domain']!r}")
        if record.get("answer") is not None and not isinstance(record["answer"], str):
            raise InputError(f"{where}: field 'answer' must be a string or null")
        rollouts = record.get("rollouts")
        if not isinstance(rollouts, list) or not rollouts:
            raise InputError(f"{where}: field 'rollouts' must be a non-empty list")
        for i, rollout in enumerate(rollouts):
            if not isinstance(rollout, dict) or not isinstance(rollout.get("text"), str):
                raise InputError(f"{where}: rollouts[{i}] must be an object with a string 'text'")
            if rollout.get("finish_reason") not in FINISH_REASONS:
                raise InputError(f"{where}: rollouts[{i}].finish_reason must be one of {FINISH_REASONS}")
            if verified and not isinstance(rollout.get("passed"), bool):
                raise InputError(f"{where}: rollouts[{i}].passed must be true or false (run `selfplay verify` first)")
        records.append({**record, "domain": record.get("domain", "math"), "answer": record.get("answer")})
    if not records:
        raise InputError(f"{path}: no records")
    return records


def unit_test_request(problem: str) -> str:
    return _UNIT_TEST_INSTRUCTION.format(problem=problem.strip())


def generate_unit_tests(teacher, problems: list[str], num_calls: int = 4, temperature: float = 1.0,
                        max_tokens: int = 1024, seed: int = 0, use_tqdm: bool = True) -> list[list[dict]]:
    """Unit tests for each problem statement: `num_calls` independent teacher samples, each asked for ONE
    {"input", "output"} test. Answers cut at max_tokens are dropped, then `consistent_tests` filters the
    rest: a teacher that gives one input different outputs contradicts itself, so neither is trusted."""
    prompts = [teacher.tokenizer.apply_chat_template([{"role": "user", "content": unit_test_request(p)}])
               for p in problems]
    params = [SamplingParams(n=num_calls, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(problems))]
    outputs = teacher.generate(prompts, params, use_tqdm=use_tqdm)
    return [consistent_tests([parse_unit_test(c.text) for c in output.outputs if c.finish_reason == "stop"])
            for output in outputs]


def consistent_tests(tests: list[dict | None]) -> list[dict]:
    """Parsed teacher tests (None: unreadable) without the unreadable ones, without repeats, and without
    any input that was given different expected outputs."""
    by_input: dict[str, list[str]] = {}
    for test in tests:
        if test is not None:
            by_input.setdefault(test["input"], []).append(test["output"])
    return [{"input": test_input, "output": outputs[0]} for test_input, outputs in by_input.items()
            if all(outputs_match(other, outputs[0]) for other in outputs[1:])]
