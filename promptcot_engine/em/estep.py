"""E-step: K rationales per (c, x) from the rationale model q at temperature 1.0, each rewarded by the
current prompt model p with R(z) = log p(z | c) + log p(x | z, c): the token log-prob sums over the z span
and the x span of one teacher-forced pass over p's completion (the concept prompt is context, never
scored); the argmax is kept as the (c, x) pair's rationale, and q is then fine-tuned on the winners."""
from __future__ import annotations

from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.templates import (
    PROBLEM_SEGMENT,
    RATIONALE_SEGMENT,
    prompt_model_prompt,
    prompt_model_segments,
    rationale_model_prompt,
)
from promptcot_engine.engine.llm import LLM
from promptcot_engine.engine.random_streams import record_seed
from promptcot_engine.sampling_params import SamplingParams


def rationale_examples(triples: list[dict], rationale_field: str = "rationale") -> list[dict]:
    """SFT data for q: (c, x) -> z."""
    return [{"prompt": rationale_model_prompt(t["concepts"], t["level"], t["problem"], t["domain"]),
             "completion": t[rationale_field]} for t in triples]


def prompt_model_examples(triples: list[dict], rationale_field: str = "rationale") -> list[dict]:
    """SFT data for p: c -> (z, x), as the same segments the reward scores."""
    return [{"prompt": prompt_model_prompt(t["concepts"], t["level"], t["domain"]),
             "completion": prompt_model_segments(t[rationale_field], t["problem"])} for t in triples]


def sample_and_score(q: LLM, p: LLM, triples: list[dict], config: EMConfig, iteration: int) -> list[list[dict]]:
    """One list of K candidate records per triple, each with both reward terms."""
    params = [SamplingParams(n=config.k, temperature=config.estep_temperature, max_tokens=config.max_tokens,
                             seed=record_seed(config.seed, "estep", iteration, t["id"])) for t in triples]
    prompts = [rationale_model_prompt(t["concepts"], t["level"], t["problem"], t["domain"]) for t in triples]
    outputs = q.generate(prompts, params, use_tqdm=False)

    candidates, contexts, continuations, scored = [], [], [], []
    for t, out in zip(triples, outputs):
        # tokenized here once, as LLM.score would (special tokens on the context only), to check the length
        context = p.tokenizer.encode_prompt(prompt_model_prompt(t["concepts"], t["level"], t["domain"]))
        for c in out.outputs:
            z = c.text.strip()
            record = {"id": t["id"], "iteration": iteration, "k": c.index, "rationale": z,
                      "finish_reason": c.finish_reason, "rationale_tokens": None, "problem_tokens": None,
                      "log_p_z": None, "log_p_x_given_z": None, "reward": None, "valid": False}
            candidates.append(record)
            if not z:
                record["invalid_reason"] = "empty"
                continue
            segments = [p.tokenizer.encode(s, add_special_tokens=False) for s in prompt_model_segments(z, t["problem"])]
            length = len(context) + sum(len(s) for s in segments)
            if length >= p.engine.max_model_len:
                record["invalid_reason"] = "longer than the prompt model's context"
                continue
            contexts.append(context)
            continuations.append(segments)
            scored.append(record)
    for record, score in zip(scored, p.score(contexts, continuations, use_tqdm=False)):
        sums, lengths = score.segment_logprob_sums, score.segment_lengths
        log_p_z, log_p_x = sums[RATIONALE_SEGMENT], sums[PROBLEM_SEGMENT]
        z_tokens, x_tokens = lengths[RATIONALE_SEGMENT], lengths[PROBLEM_SEGMENT]
        reward = log_p_z + log_p_x
        if config.length_normalize:
            reward /= max(z_tokens + x_tokens, 1)
        record.update(log_p_z=log_p_z, log_p_x_given_z=log_p_x, reward=reward, rationale_tokens=z_tokens,
                      problem_tokens=x_tokens, valid=True)

    per_triple, start = [], 0
    for out in outputs:
        per_triple.append(candidates[start:start + len(out.outputs)])
        start += len(out.outputs)
    return per_triple


def select_winners(triples: list[dict], candidates: list[dict]) -> tuple[list[dict], int]:
    """Each triple with its rationale replaced by its best candidate's (ties: the lowest k); a triple with no
    valid candidate keeps its current rationale. Returns (winners, how many kept their rationale)."""
    best: dict[str, dict] = {}
    for c in candidates:
        if c["valid"] and (c["id"] not in best or c["reward"] > best[c["id"]]["reward"]):
            best[c["id"]] = c
    winners, unchanged = [], 0
    for t in triples:
        b = best.get(t["id"])
        if b is None:
            unchanged += 1
            winners.append({**t, "reward": None, "k": None})
        else:
            winners.append({**t, "rationale": b["rationale"], "reward": b["reward"], "k": b["k"],
                            "log_p_z": b["log_p_z"], "log_p_x_given_z": b["log_p_x_given_z"],
                            "rationale_tokens": b["rationale_tokens"], "problem_tokens": b["problem_tokens"]})
    return winners, unchanged
