"""M-step: one greedy (temperature 0) rationale per (c, x) from the updated rationale model q; the prompt
model p is then fine-tuned on c -> (z, x). An empty decode keeps the E-step winner's rationale."""
from __future__ import annotations

from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.templates import rationale_model_prompt
from promptcot_engine.engine.llm import LLM
from promptcot_engine.sampling_params import SamplingParams


def greedy_rationales(q: LLM, winners: list[dict], config: EMConfig, iteration: int) -> list[list[dict]]:
    prompts = [rationale_model_prompt(w["concepts"], w["level"], w["problem"], w["domain"]) for w in winners]
    outputs = q.generate(prompts, SamplingParams(temperature=0, max_tokens=config.max_tokens), use_tqdm=False)
    records = []
    for w, out in zip(winners, outputs):
        c = out.outputs[0]
        z = c.text.strip()
        records.append([{**{k: w[k] for k in ("id", "problem", "concepts", "level", "domain")}, "iteration": iteration,
                         "rationale": z or w["rationale"], "rationale_tokens": len(c.token_ids),
                         "finish_reason": c.finish_reason, "fallback_to_estep": not z}])
    return records
