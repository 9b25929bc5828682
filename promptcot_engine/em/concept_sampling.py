"""Concept sets c for synthesis, built from the annotated seed pool.

The rule, for each of the n sets (seeded with random.Random(seed): the same seeds in the same order and
the same `seed` give the same sets):
  1. pick a base seed uniformly among the seeds that have concepts and a level; the set takes its level
     and domain;
  2. take the base's distinct concepts (a random subset, in order, when it has more than concepts_per_set);
  3. swap k of them, k uniform in 1 .. concepts_per_set // 2, for concepts drawn uniformly without
     replacement from the pool of distinct concepts of the same domain (never one already in the set),
     and fill up to concepts_per_set from the same pool when the base has fewer.

Why: keeping at least half of a real seed's concepts at its level keeps the set coherent -- those
concepts are known to combine into a problem of that difficulty -- while the swapped ones make
combinations no seed had, which is what synthesis is for. Draws are uniform rather than weighted by
co-occurrence because teacher concepts are free text: nearly every concept string occurs in a single
seed, so co-occurrence counts are zero outside the base seed and would only rebuild the base set.
"""
from __future__ import annotations

import random

from promptcot_engine.errors import InputError


def sample_concept_sets(annotated_seeds: list[dict], n: int, seed: int, concepts_per_set: int = 5) -> list[dict]:
    """n dicts {"concepts", "level", "domain", "source_id"}; see the module docstring for the rule."""
    if not isinstance(n, int) or n < 0:
        raise InputError(f"n: expected a non-negative integer, got {n!r}")
    if not isinstance(concepts_per_set, int) or concepts_per_set < 1:
        raise InputError(f"concepts_per_set: expected a positive integer, got {concepts_per_set!r}")
    bases = [s for s in annotated_seeds if s.get("concepts") and s.get("level")]
    if n and not bases:
        raise InputError("no annotated seeds: every seed lacks concepts or a level")
    pools: dict[str, list[str]] = {}
    for base in bases:
        pool = pools.setdefault(base.get("domain", "math"), [])
        pool.extend(base["concepts"])
    pools = {domain: _distinct(pool) for domain, pool in pools.items()}

    rng = random.Random(seed)
    concept_sets = []
    for _ in range(n):
        base = bases[rng.randrange(len(bases))]
        domain = base.get("domain", "math")
        concepts = _distinct(base["concepts"])
        if len(concepts) > concepts_per_set:
            kept = sorted(rng.sample(range(len(concepts)), concepts_per_set))
            concepts = [concepts[i] for i in kept]
        num_swaps = min(rng.randint(1, concepts_per_set // 2), len(concepts)) if concepts_per_set >= 2 else 0
        taken = {_key(concept) for concept in concepts}
        fresh = _draw_fresh(pools[domain], taken, num_swaps + concepts_per_set - len(concepts), rng)
        swapped = rng.sample(range(len(concepts)), min(num_swaps, len(fresh)))
        for position, concept in zip(swapped, fresh):
            concepts[position] = concept
        concepts.extend(fresh[len(swapped):])
        concept_sets.append({"concepts": concepts, "level": base["level"], "domain": domain, "source_id": base["id"]})
    return concept_sets


def _key(concept: str) -> str:
    return " ".join(concept.split()).casefold()


def _distinct(concepts: list[str]) -> list[str]:
    """The first spelling of each concept, compared case-insensitively with whitespace collapsed."""
    seen, distinct = set(), []
    for concept in concepts:
        key = _key(concept)
        if key not in seen:
            seen.add(key)
            distinct.append(concept)
    return distinct


def _draw_fresh(pool: list[str], taken: set[str], count: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct pool concepts whose _key is not in `taken`, uniformly at random."""
    if count <= 0:
        return []
    if len(pool) <= 4 * (count + len(taken)):
        candidates = [concept for concept in pool if _key(concept) not in taken]
        return rng.sample(candidates, min(count, len(candidates)))
    # A large pool: rejection sampling is O(count) instead of a pass over the pool per set, and each draw
    # is rejected with probability < 1/4 since the pool holds distinct concepts.
    fresh = []
    while len(fresh) < count:
        concept = pool[rng.randrange(len(pool))]
        if _key(concept) not in taken:
            taken.add(_key(concept))
            fresh.append(concept)
    return fresh
