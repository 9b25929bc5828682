"""Cold-start annotation: a teacher model turns each seed problem x into a triple (c, z, x).

For each seed, in three rounds over the whole chunk (so the engine batches them):
  1. concepts, unless the seed has them: the "educational assessment expert" prompt, answered greedily and
     parsed as a Python list (promptcot_engine.em.concepts.parse_concepts, which falls back to JSON,
     numbered lines and quoted strings); when nothing parses, one seeded sampled retry; when that fails
     too, the fallback: the problem's longest distinct words (the concept_source field says which);
  2. the level, unless the seed has one: code seeds are "codeforces"; math seeds ask the teacher to pick
     one of the SPEC's levels, falling back to EMConfig.default_level;
  3. the rationale: the "problem design expert" prompt, the text after "Thinking Process:"; one sampled
     retry when it is missing or empty; a seed still without a rationale is dropped (and counted).
"""
from __future__ import annotations

import re

from promptcot_engine.em.concepts import parse_concepts
from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.templates import (
    CODE_LEVEL,
    concept_extraction_prompt,
    level_prompt,
    parse_level,
    parse_rationale,
    rationale_prompt,
)
from promptcot_engine.engine.llm import LLM
from promptcot_engine.engine.random_streams import record_seed
from promptcot_engine.errors import InputError
from promptcot_engine.sampling_params import SamplingParams


def teacher_prompt(teacher: LLM, text: str) -> str:
    """The instruction as a user turn in the teacher's chat template (plain text for a model without one)."""
    try:
        return teacher.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    except InputError:
        return text


def fallback_concepts(problem: str, count: int) -> list[str]:
    words = sorted(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z][A-Za-z-]{3,}", problem)), key=len, reverse=True)
    return words[:count] or ["problem solving"]


def _ask(teacher: LLM, prompts: list[str], max_tokens: int, seeds: list[int] | None = None) -> list[str]:
    """Greedy answers, or seeded samples at temperature 0.7 when seeds are given (the retries)."""
    if not prompts:
        return []
    if seeds is None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
    else:
        params = [SamplingParams(temperature=0.7, max_tokens=max_tokens, seed=s) for s in seeds]
    return [o.outputs[0].text for o in teacher.generate([teacher_prompt(teacher, p) for p in prompts], params, use_tqdm=False)]


def _answer_with_retry(teacher: LLM, prompts: list[str], parse, max_tokens: int, retry_seeds: list[int]) -> tuple[list, list[bool]]:
    answers = [parse(text) for text in _ask(teacher, prompts, max_tokens)]
    failed = [i for i, a in enumerate(answers) if not a]
    retries = _ask(teacher, [prompts[i] for i in failed], max_tokens, [retry_seeds[i] for i in failed])
    for i, text in zip(failed, retries):
        answers[i] = parse(text)
    failed_set = set(failed)
    retried = [i in failed_set for i in range(len(prompts))]
    return answers, retried


def annotate_seeds(teacher: LLM, seeds: list[dict], config: EMConfig) -> list[list[dict]]:
    """One list per seed: [the triple record], or [] when no rationale could be had (counted by the caller)."""
    n = config.num_concepts
    max_tokens = config.max_tokens

    concepts = [list(s["concepts"]) if s.get("concepts") else None for s in seeds]
    concept_source = ["seed" if c else "teacher" for c in concepts]
    need = [i for i, c in enumerate(concepts) if c is None]
    parsed, _ = _answer_with_retry(
        teacher, [concept_extraction_prompt(seeds[i]["problem"], n, seeds[i]["domain"]) for i in need],
        lambda text: parse_concepts(text, max_concepts=n), min(max_tokens, 512),
        [record_seed(config.seed, "concepts", seeds[i]["id"]) for i in need])
    for i, found in zip(need, parsed):
        concepts[i] = found or fallback_concepts(seeds[i]["problem"], n)
        concept_source[i] = "teacher" if found else "fallback"

    levels = [s.get("level") or (CODE_LEVEL if s["domain"] == "code" else None) for s in seeds]
    level_source = ["seed" if s.get("level") else "domain" for s in seeds]
    need = [i for i, level in enumerate(levels) if level is None]
    answers = _ask(teacher, [level_prompt(seeds[i]["problem"]) for i in need], 64)
    for i, text in zip(need, answers):
        parsed_level = parse_level(text)
        levels[i] = parsed_level or config.default_level
        level_source[i] = "teacher" if parsed_level else "default"

    rationales, retried = _answer_with_retry(
        teacher, [rationale_prompt(concepts[i], levels[i], s["problem"], s["domain"]) for i, s in enumerate(seeds)],
        parse_rationale, max_tokens, [record_seed(config.seed, "rationale", s["id"]) for s in seeds])

    records = []
    for i, seed in enumerate(seeds):
        if not rationales[i]:
            records.append([])
            continue
        records.append([{**seed, "concepts": concepts[i], "level": levels[i], "rationale": rationales[i].strip(),
                         "concept_source": concept_source[i], "level_source": level_source[i],
                         "rationale_retried": retried[i]}])
    return records
