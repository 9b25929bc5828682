"""SFT data by teacher distillation: one solution trace per problem, kept when it ends with a valid final
answer (\\boxed{} for math, a ```python block for code) within the token limit (16,384 by default).

The teacher gets the same request as the self-play policy (rollouts.solution_request). A trace is
generated with max_tokens = the limit, so "over the limit" is "cut at max_tokens" (finish_reason
"length", also when the teacher's context length ran out first), counted in the teacher's tokens.
Whether a final answer is right is not checked: synthesized problems have no reference answer.

Output records are {"id", "domain", "prompt", "completion"}: the prompt is the request text itself, or,
when a student tokenizer is given, the request rendered with the student's chat template (as the
student's own self-play rollouts will see it), since the SFT trainer tokenizes "prompt" as given.
"""
from __future__ import annotations

from promptcot_engine.sampling_params import SamplingParams
from promptcot_engine.selfplay.code import extract_code
from promptcot_engine.selfplay.math import extract_boxed
from promptcot_engine.selfplay.rollouts import policy_prompt, solution_request

DROP_REASONS = ("too_long", "no_final_answer")


def has_final_answer(text: str, domain: str) -> bool:
    return (extract_code(text) if domain == "code" else extract_boxed(text)) is not None


def build_sft_data(teacher, problems: list[dict], max_trace_tokens: int = 16384, temperature: float = 0.6,
                   top_p: float = 0.95, seed: int = 0, student_tokenizer=None,
                   use_tqdm: bool = True) -> tuple[list[dict], dict]:
    """Distil one trace per problem from `teacher`; returns the kept records and
    {"problems", "kept", "dropped": {reason: count}}."""
    teacher_prompts = [policy_prompt(teacher.tokenizer, p["problem"], p["domain"]) for p in problems]
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_trace_tokens, seed=seed + i)
              for i in range(len(problems))]
    outputs = teacher.generate(teacher_prompts, params, use_tqdm=use_tqdm)
    records, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for problem, output in zip(problems, outputs):
        trace = output.outputs[0]
        if trace.finish_reason == "length":
            dropped["too_long"] += 1
        elif not has_final_answer(trace.text, problem["domain"]):
            dropped["no_final_answer"] += 1
        else:
            prompt = (solution_request(problem["problem"], problem["domain"]) if student_tokenizer is None
                      else policy_prompt(student_tokenizer, problem["problem"], problem["domain"]))
            records.append({"id": problem["id"], "domain": problem["domain"], "prompt": prompt,
                            "completion": trace.text})
    return records, {"problems": len(problems), "kept": len(records), "dropped": dropped}
