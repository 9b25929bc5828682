"""Seed loading (CHAMP checked against the champ-dataset package's own loader) and concept-set sampling."""
import math
from collections import Counter

import pytest

from promptcot_engine.em.concept_sampling import sample_concept_sets
from promptcot_engine.em.seeds import load_champ_seeds, load_seeds, load_seeds_jsonl
from promptcot_engine.errors import InputError
from tests.jsonl_lines import write_jsonl_lines

SEED_KEYS = {"id", "problem", "concepts", "level", "answer", "domain"}


@pytest.fixture(scope="module")
def champ_seeds():
    return load_champ_seeds()


def test_champ_seeds_match_the_packages_own_loader(champ_seeds):
    natsort = pytest.importorskip("natsort")
    champ_dataset = pytest.importorskip("champ_dataset")
    dataset = champ_dataset.load("v0")
    identifiers = natsort.natsorted(dataset.problems)
    assert [seed["id"] for seed in champ_seeds] == [f"champ/{identifier}" for identifier in identifiers]
    for seed, identifier in zip(champ_seeds, identifiers):
        problem = dataset.problems[identifier]
        assert (seed["problem"], seed["answer"]) == (problem.text, problem.answer)


def test_champ_seeds_shape_and_order(champ_seeds):
    assert len(champ_seeds) == 270
    assert len({seed["id"] for seed in champ_seeds}) == 270
    for seed in champ_seeds:
        assert set(seed) == SEED_KEYS
        assert seed["domain"] == "math" and seed["concepts"] is None and seed["level"] is None
        assert seed["problem"].strip() and isinstance(seed["answer"], str)
    ids = [seed["id"] for seed in champ_seeds]
    assert ids[:2] == ["champ/P_Combinatorics_1", "champ/P_Combinatorics_2"]
    assert ids.index("champ/P_Combinatorics_10") == ids.index("champ/P_Combinatorics_9") + 1


def test_load_seeds_champ_with_limit(champ_seeds):
    assert load_seeds("champ", limit=3) == champ_seeds[:3]
    with pytest.raises(InputError, match="limit"):
        load_seeds("champ", limit=0)


def test_load_seeds_jsonl(tmp_path):
    path = write_jsonl_lines(tmp_path / "my_seeds.jsonl", [
        {"problem": "Find x.", "answer": 42},
        "",
        {"id": "p7", "problem": "Sort it.", "domain": "code", "concepts": ["Sorting"], "level": "codeforces"},
        {"problem": "Prove it.", "concepts": [], "answer": "yes", "source": "kept out"},
    ])
    assert load_seeds_jsonl(path) == [
        {"id": "my_seeds/1", "problem": "Find x.", "concepts": None, "level": None, "answer": "42", "domain": "math"},
        {"id": "p7", "problem": "Sort it.", "concepts": ["Sorting"], "level": "codeforces", "answer": None, "domain": "code"},
        {"id": "my_seeds/4", "problem": "Prove it.", "concepts": None, "level": None, "answer": "yes", "domain": "math"},
    ]
    assert load_seeds(str(path), limit=2) == load_seeds_jsonl(path)[:2]


@pytest.mark.parametrize(
    "lines,message",
    [
        ([{"problem": "ok"}, {"answer": "1"}], r"seeds.jsonl:2: field 'problem'"),
        ([{"problem": 5}], r"seeds.jsonl:1: field 'problem'"),
        ([{"problem": "  "}], r"seeds.jsonl:1: field 'problem'"),
        ([{"problem": "ok", "concepts": "Parity"}], r"seeds.jsonl:1: field 'concepts' must be a list"),
        ([{"problem": "ok", "concepts": ["Parity", 3]}], r"seeds.jsonl:1: field 'concepts'\[1\]"),
        ([{"problem": "ok", "domain": "physics"}], r"seeds.jsonl:1: field 'domain'"),
        ([{"problem": "ok", "level": 3}], r"seeds.jsonl:1: field 'level'"),
        ([{"problem": "ok", "answer": ["1"]}], r"seeds.jsonl:1: field 'answer'"),
        ([{"problem": "ok", "id": 7}], r"seeds.jsonl:1: field 'id'"),
        ([{"id": "a", "problem": "x"}, {"id": "b", "problem": "y"}, {"id": "a", "problem": "z"}],
         r"seeds.jsonl:3: duplicate id 'a' \(first on line 1\)"),
        # An assigned id can collide with an explicit one.
        ([{"problem": "x"}, {"id": "seeds/1", "problem": "y"}], r"seeds.jsonl:2: duplicate id 'seeds/1'"),
        ([{"problem": "ok"}, "{not json"], r"seeds.jsonl:2: invalid JSON"),
        ([], r"seeds.jsonl: no seed problems"),
    ],
)
def test_load_seeds_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl_lines(tmp_path / "seeds.jsonl", lines)
    with pytest.raises(InputError, match=message):
        load_seeds_jsonl(path)


def test_load_seeds_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_seeds(str(tmp_path / "absent.jsonl"))


def annotated(num_seeds, concepts_per_seed=5, domain="math", prefix="m"):
    return [
        {"id": f"{prefix}{i}", "problem": f"Problem {i}", "level": ("AIME", "USAMO")[i % 2], "domain": domain,
         "concepts": [f"{prefix} concept {i}.{j}" for j in range(concepts_per_seed)], "answer": None}
        for i in range(num_seeds)
    ]


def test_concept_sets_follow_the_rule():
    seeds = annotated(40) + annotated(10, domain="code", prefix="c") + [
        {"id": "bare", "problem": "p", "concepts": None, "level": None, "domain": "math"},
        {"id": "no-level", "problem": "p", "concepts": ["Lonely concept"], "level": None, "domain": "math"},
    ]
    by_id = {seed["id"]: seed for seed in seeds}
    sets = sample_concept_sets(seeds, n=400, seed=3)
    assert len(sets) == 400
    swaps = Counter()
    for concept_set in sets:
        base = by_id[concept_set["source_id"]]
        assert concept_set["level"] == base["level"] and concept_set["domain"] == base["domain"]
        concepts = concept_set["concepts"]
        assert len(concepts) == 5 and len(set(concepts)) == 5
        swapped = [c for c in concepts if c not in base["concepts"]]
        swaps[len(swapped)] += 1
        # Fresh concepts come from annotated seeds of the same domain, never from unusable seeds.
        prefix = "c" if base["domain"] == "code" else "m"
        assert all(c.startswith(f"{prefix} concept ") for c in swapped)
        # The base's kept concepts stay in their positions.
        assert all(c == base["concepts"][i] for i, c in enumerate(concepts) if c in base["concepts"])
    assert set(swaps) == {1, 2}
    assert {concept_set["source_id"] for concept_set in sets} == {seed["id"] for seed in seeds[:50]}


def test_concept_sets_are_seeded():
    seeds = annotated(30)
    assert sample_concept_sets(seeds, 50, seed=11) == sample_concept_sets(seeds, 50, seed=11)
    assert sample_concept_sets(seeds, 50, seed=11) != sample_concept_sets(seeds, 50, seed=12)
    assert sample_concept_sets(seeds, 0, seed=11) == []


def test_base_seeds_are_drawn_uniformly():
    sets = sample_concept_sets(annotated(4), n=4000, seed=0)
    counts = Counter(concept_set["source_id"] for concept_set in sets)
    # Binomial(4000, 1/4): standard deviation ~27; 6 deviations apart is a broken rule, not bad luck.
    assert all(abs(count - 1000) < 6 * math.sqrt(4000 * 0.25 * 0.75) for count in counts.values())


def test_short_and_long_bases():
    seeds = [
        {"id": "short", "problem": "p", "level": "AIME", "domain": "math", "concepts": ["Parity", "parity "]},
        {"id": "long", "problem": "p", "level": "AIME", "domain": "math", "concepts": [f"Long {j}" for j in range(9)]},
    ]
    for concept_set in sample_concept_sets(seeds, n=60, seed=5, concepts_per_set=4):
        concepts = concept_set["concepts"]
        assert len({c.casefold().strip() for c in concepts}) == len(concepts)
        if concept_set["source_id"] == "long":
            assert len(concepts) == 4
            # At least half of the 4 come from the base (a swap may also draw one of its unused concepts).
            assert sum(c.startswith("Long") for c in concepts) >= 2
        else:
            assert len(concepts) == 4  # topped up from the pool: 1 own concept (deduped) + 3 fresh
            assert sum(c.casefold().strip() == "parity" for c in concepts) <= 1


def test_a_tiny_pool_gives_what_it_has():
    seeds = [{"id": "only", "problem": "p", "level": "AIME", "domain": "math", "concepts": ["A", "B"]}]
    sets = sample_concept_sets(seeds, n=5, seed=0, concepts_per_set=5)
    assert all(sorted(concept_set["concepts"]) == ["A", "B"] for concept_set in sets)


@pytest.mark.parametrize(
    "seeds,n,per_set,message",
    [
        ([{"id": "x", "problem": "p", "concepts": None, "level": "AIME"}], 1, 5, "no annotated seeds"),
        (annotated(2), -1, 5, "n:"),
        (annotated(2), 1, 0, "concepts_per_set"),
    ],
)
def test_concept_sampling_input_errors(seeds, n, per_set, message):
    with pytest.raises(InputError, match=message):
        sample_concept_sets(seeds, n, seed=0, concepts_per_set=per_set)
