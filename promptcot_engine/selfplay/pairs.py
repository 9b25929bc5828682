"""From rollouts to DPO pairs: verify each rollout, keep the problems the policy sometimes solves, pair a
passing rollout with a failing one, and optionally precompute the reference log-probs.

Verification marks every rollout with "passed":
- math: the last \\boxed{} against the problem's "answer", or, when it has none, against the majority
  vote of the rollouts' own answers (equivalent spellings count together);
- code: the last ```python block run in the sandbox on the problem's unit tests (written by a teacher,
  see rollouts.generate_unit_tests); a rollout passes when its program passes every test, and the
  teacher's expected outputs are trusted. A wrong expected output fails every correct program, so
  such a problem is mostly solved by none and dropped by the filter below; only a wrong program that
  prints that same wrong output would be labelled as passing. A problem without tests passes no rollout.
A rollout cut at max_tokens ("length") never passes and takes no part in the vote: its solution is
unfinished, and as a chosen completion the trainer would teach EOS where the policy never stopped.

Filter (the paper's): drop problems solved in none or at least half of their rollouts. Pairs: the i-th
passing rollout with the i-th failing one, min(passing, failing) pairs per problem.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from promptcot_engine.selfplay.code import extract_code, run_tests
from promptcot_engine.selfplay.math import extract_boxed, is_equivalent, majority_vote


def verify_math(record: dict, timeout: float = 5.0) -> dict:
    """The record with "reference", "reference_source" ("answer" | "majority_vote") and per-rollout
    "extracted" (the boxed answer or None) and "passed"."""
    answers = [extract_boxed(r["text"]) if r["finish_reason"] == "stop" else None for r in record["rollouts"]]
    if record.get("answer") is not None:
        reference, source = record["answer"], "answer"
    else:
        reference, source = majority_vote(answers, timeout=timeout), "majority_vote"
    rollouts = [{**rollout, "extracted": answer,
                 "passed": answer is not None and reference is not None and is_equivalent(answer, reference, timeout)}
                for rollout, answer in zip(record["rollouts"], answers)]
    return _with_rollouts({**record, "reference": reference, "reference_source": source}, rollouts)


def verify_code(record: dict, tests: list[dict], timeout: float = 5.0, memory_mb: int = 512) -> dict:
    """The record with its "tests" and per-rollout "passed" and "test_statuses" (the sandbox status of
    each test run; a rollout stops at its first failing test, and has none without a program)."""
    rollouts = []
    for rollout in record["rollouts"]:
        program = extract_code(rollout["text"]) if rollout["finish_reason"] == "stop" else None
        statuses = []
        if program is not None:
            for test in tests:
                statuses.append(run_tests(program, [test], timeout=timeout, memory_mb=memory_mb)[0].status)
                if statuses[-1] != "ok":
                    break
        passed = program is not None and bool(tests) and statuses == ["ok"] * len(tests)
        rollouts.append({**rollout, "passed": passed, "test_statuses": statuses})
    return _with_rollouts({**record, "tests": tests}, rollouts)


def verify_rollouts(records: list[dict], tests_by_id: dict[str, list[dict]], timeout: float = 5.0,
                    memory_mb: int = 512, workers: int | None = None, use_tqdm: bool = True) -> tuple[list[dict], dict]:
    """Verify every record, `workers` problems at a time (default: one per CPU; each runs its sandboxed
    programs or its own equivalence worker process). A code record's tests come from `tests_by_id` (none
    there: no rollout passes). Returns the records, in order, and counts."""
    def verify(record: dict) -> dict:
        if record["domain"] == "code":
            return verify_code(record, tests_by_id.get(record["id"], []), timeout, memory_mb)
        return verify_math(record, timeout)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        verified = list(tqdm(pool.map(verify, records), total=len(records), desc="verify", unit="problem",
                             disable=not use_tqdm, dynamic_ncols=True))
    stats = {"problems": len(verified),
             "rollouts": sum(len(r["rollouts"]) for r in verified),
             "passed": sum(r["num_passed"] for r in verified),
             "code_problems_without_tests": sum(1 for r in verified if r["domain"] == "code" and not r["tests"]),
             "math_problems_without_reference": sum(1 for r in verified if r["domain"] == "math" and r["reference"] is None)}
    return verified, stats


def _with_rollouts(record: dict, rollouts: list[dict]) -> dict:
    return {**record, "rollouts": rollouts, "num_passed": sum(r["passed"] for r in rollouts)}


def passes_difficulty_filter(num_passed: int, num_rollouts: int) -> bool:
    """Kept when solved at least once and in fewer than half of the rollouts."""
    return 0 < num_passed and 2 * num_passed < num_rollouts


def build_pairs(records: list[dict]) -> tuple[list[dict], dict]:
    """{"id", "problem_id", "prompt", "chosen", "rejected"} records from verified rollout records, with
    counts of the problems dropped by the filter."""
    pairs = []
    stats = {"problems": len(records), "dropped_none_solved": 0, "dropped_half_or_more_solved": 0,
             "kept": 0, "pairs": 0}
    for record in records:
        passing = [r["text"] for r in record["rollouts"] if r["passed"]]
        failing = [r["text"] for r in record["rollouts"] if not r["passed"]]
        if not passes_difficulty_filter(len(passing), len(record["rollouts"])):
            stats["dropped_none_solved" if not passing else "dropped_half_or_more_solved"] += 1
            continue
        stats["kept"] += 1
        for i, (chosen, rejected) in enumerate(zip(passing, failing)):
            pairs.append({"id": f"{record['id']}/{i}", "problem_id": record["id"], "prompt": record["prompt"],
                          "chosen": chosen, "rejected": rejected})
    stats["pairs"] = len(pairs)
    return pairs, stats


def add_reference_logprobs(llm, pairs: list[dict], use_tqdm: bool = True) -> list[dict]:
    """Each pair with "ref_chosen_logprob" / "ref_rejected_logprob": the summed log-probs of the completion
    tokens given the prompt under `llm` (the reference policy), tokenized exactly as the DPO trainer
    tokenizes them (the prompt with special tokens, the completion on its own without them, then EOS)."""
    from promptcot_engine.train.data import completion_token_ids

    if not pairs:
        return []
    contexts, continuations = [], []
    for pair in pairs:
        for field in ("chosen", "rejected"):
            contexts.append(pair["prompt"])
            continuations.append(completion_token_ids(llm.tokenizer, pair[field]))
    scores = llm.score(contexts, continuations, use_tqdm=use_tqdm)
    return [{**pair, "ref_chosen_logprob": chosen.logprob_sum, "ref_rejected_logprob": rejected.logprob_sum}
            for pair, chosen, rejected in zip(pairs, scores[0::2], scores[1::2])]
