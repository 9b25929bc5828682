"""Synthesis: concept sets from the annotated pool (concept_sampling's documented rule) go to the prompt
model p, which samples rationale + problem at temperature 0.8 / top-p 1.0; outputs missing either marker
pair are dropped and counted; the rest are deduplicated (exact, then MinHash + Jaccard > 0.2)."""
from __future__ import annotations

from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.templates import parse_prompt_model_output, prompt_model_prompt
from promptcot_engine.engine.llm import LLM
from promptcot_engine.engine.random_streams import record_seed
from promptcot_engine.sampling_params import SamplingParams


def synthesis_requests(concept_sets: list[dict]) -> list[dict]:
    return [{"id": f"synth-{i:07d}", **s, "prompt": prompt_model_prompt(s["concepts"], s["level"], s["domain"])}
            for i, s in enumerate(concept_sets)]


def generate_problems(p: LLM, requests: list[dict], config: EMConfig, iteration: int) -> list[list[dict]]:
    """One output record per request, parsed; "valid" says whether both marker pairs were there."""
    params = [SamplingParams(temperature=config.synthesis_temperature, top_p=config.synthesis_top_p,
                             max_tokens=config.synthesis_max_tokens, seed=record_seed(config.seed, "synthesis", r["id"]))
              for r in requests]
    outputs = p.generate([r["prompt"] for r in requests], params, use_tqdm=False)
    records = []
    for r, out in zip(requests, outputs):
        c = out.outputs[0]
        parsed = parse_prompt_model_output(c.text)
        records.append([{**r, "iteration": iteration, "valid": parsed is not None,
                         "rationale": parsed[0] if parsed else None, "problem": parsed[1] if parsed else None,
                         "output": c.text, "finish_reason": c.finish_reason}])
    return records


def final_problem(record: dict) -> dict:
    keys = ("id", "prompt", "problem", "rationale", "concepts", "level", "domain", "iteration", "source_id")
    return {k: record[k] for k in keys}
