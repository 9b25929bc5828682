"""Dedup against a brute-force reference (exact Jaccard over all kept pairs), and the `promptcot dedup` command."""
import json
import random

import pytest
from click.testing import CliRunner

from promptcot_engine.cli import main
from promptcot_engine.em.dedup import dedup, word_set
from promptcot_engine.errors import InputError
from tests.jsonl_lines import write_jsonl_lines


def reference_dedup(texts):
    """Indices kept by the SPEC's rule without hashing: whitespace-normalized exact match, then exact
    Jaccard > 0.2 against every kept text; first occurrence wins."""
    kept, kept_sets, seen = [], [], set()
    for index, text in enumerate(texts):
        normalized = " ".join(text.split())
        if normalized in seen:
            continue
        seen.add(normalized)
        words = word_set(text)
        if words and any(len(words & other) / len(words | other) > 0.2 for other in kept_sets):
            continue
        kept.append(index)
        kept_sets.append(words)
    return kept


def records(texts):
    return [{"id": i, "problem": text} for i, text in enumerate(texts)]


def test_word_set_rule():
    text = "Let $ABCD$ be a Square, with side-length 2024; find ITS area (in cm^2) 3.14159 and x_1234!"
    assert word_set(text) == {"abcd", "square", "with", "sidelength", "find", "area", "x1234"}
    assert word_set("a b cde 12345 1,000") == frozenset()


ORIGINAL = ("Triangle ABC has sides of lengths thirteen, fourteen and fifteen. Compute the radius of the circle "
            "inscribed in the triangle and express the answer as a common fraction.")
REWORDED = ("Triangle ABC has sides of lengths thirteen, fourteen and fifteen. Determine the radius of the circle "
            "inscribed in this triangle, giving your answer as a common fraction.")
UNRELATED = ("A sequence is defined by a_1 = 1 and a_{n+1} = a_n + 2n. Compute the remainder when the "
             "hundredth term of the sequence is divided by seven.")


def test_reworded_copy_is_dropped_and_the_first_wins():
    assert len(word_set(ORIGINAL) & word_set(REWORDED)) / len(word_set(ORIGINAL) | word_set(REWORDED)) > 0.5
    kept, stats = dedup(records([ORIGINAL, UNRELATED, REWORDED]))
    assert [r["id"] for r in kept] == [0, 1]
    assert stats == {"input": 3, "kept": 2, "exact_duplicates": 0, "near_duplicates": 1}
    kept, _ = dedup(records([REWORDED, ORIGINAL]))
    assert [r["problem"] for r in kept] == [REWORDED]


def test_exact_duplicates_after_whitespace_normalization():
    texts = [ORIGINAL, "  " + ORIGINAL.replace(" ", "\n  ", 3) + "\t", UNRELATED, "a b", "a  b", "x y z"]
    kept, stats = dedup(records(texts))
    assert [r["id"] for r in kept] == [0, 2, 3, 5]
    assert stats == {"input": 6, "kept": 4, "exact_duplicates": 2, "near_duplicates": 0}


def test_jaccard_threshold_is_strict():
    shared = ["alpha", "bravo"]
    first = " ".join(shared + ["charlie", "delta", "echo", "foxtrot"])
    at_threshold = " ".join(shared + ["golf", "hotel", "india", "juliet"])  # 2 shared of 10: Jaccard 0.2
    kept, _ = dedup(records([first, at_threshold]))
    assert len(kept) == 2
    # Identical word sets with different text are near duplicates, not exact ones.
    kept, stats = dedup(records([first, first.upper() + "!"]))
    assert stats["exact_duplicates"] == 0 and stats["near_duplicates"] == 1 and kept[0]["problem"] == first


def test_texts_without_long_words_are_only_exact_duplicates():
    texts = ["Is 1 + 1 = 2?", "Is 2 + 2 = 4?", "Is 1 + 1 = 2?", "a bc def"]
    kept, stats = dedup(records(texts))
    assert [r["id"] for r in kept] == [0, 1, 3]
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 0


def make_corpus(rng, num_originals=60, copies_per_original=3):
    """Originals over disjoint vocabularies (Jaccard 0 between families) and copies that keep 80% of the
    original's words (Jaccard >= 0.6: LSH misses such a pair with probability < 1e-10), shuffled together."""
    texts = []
    for family in range(num_originals):
        vocabulary = [f"word{family}x{j}" for j in range(40)]
        original = rng.sample(vocabulary[:30], 20)
        texts.append(" ".join(original))
        for _ in range(copies_per_original):
            copy = rng.sample(original, 16) + rng.sample(vocabulary[30:], 4)
            texts.append(" ".join(rng.sample(copy, len(copy))))
    texts += texts[:10]  # exact repeats
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("corpus_seed", [0, 1])
def test_matches_the_brute_force_reference(corpus_seed):
    texts = make_corpus(random.Random(corpus_seed))
    kept, stats = dedup(records(texts))
    expected = reference_dedup(texts)
    assert [r["id"] for r in kept] == expected
    assert len(expected) == 60
    assert stats["exact_duplicates"] == 10 and stats["kept"] + stats["near_duplicates"] + 10 == len(texts)


def test_deterministic_and_keeps_records_whole():
    texts = make_corpus(random.Random(2), num_originals=10)
    first = dedup([{"problem": t, "extra": {"n": i}} for i, t in enumerate(texts)])
    second = dedup([{"problem": t, "extra": {"n": i}} for i, t in enumerate(texts)])
    assert first == second
    assert all(set(r) == {"problem", "extra"} for r in first[0])


def test_other_key_and_bad_records():
    kept, _ = dedup([{"text": ORIGINAL}, {"text": REWORDED}], key="text")
    assert len(kept) == 1
    with pytest.raises(InputError, match="record 1: field 'problem'"):
        dedup([{"problem": ORIGINAL}, {"text": REWORDED}])
    with pytest.raises(InputError, match="record 0: field 'problem'"):
        dedup([{"problem": 3}])


def test_dedup_command(tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out" / "kept.jsonl"
    write_jsonl_lines(source, [{"problem": ORIGINAL, "n": 1}, {"problem": ORIGINAL}, "", {"problem": REWORDED},
                               {"problem": UNRELATED, "n": 4}])
    result = CliRunner().invoke(main, ["dedup", "--input", str(source), "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in target.read_text().splitlines()] == [
        {"problem": ORIGINAL, "n": 1}, {"problem": UNRELATED, "n": 4}]
    assert "read 4, dropped 1 exact and 1 near duplicates, wrote 2" in result.output


def test_dedup_command_key_option(tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl_lines(source, [{"prompt": ORIGINAL}, {"prompt": REWORDED}])
    result = CliRunner().invoke(main, ["dedup", "--input", str(source), "--output", str(target), "--key", "prompt"])
    assert result.exit_code == 0, result.output
    assert len(target.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "lines,message",
    [
        ([{"problem": ORIGINAL}, {"problem": "x"}, "{broken"], ":3: invalid JSON"),
        ([{"problem": ORIGINAL}, ["a list"]], ":2: expected a JSON object"),
        ([{"problem": ORIGINAL}, {"text": "x"}], ":2: missing field 'problem'"),
        ([{"problem": ["x"]}], ":1: field 'problem' must be a string"),
    ],
)
def test_dedup_command_errors(tmp_path, lines, message):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl_lines(source, lines)
    target.write_text("previous output\n")
    result = CliRunner().invoke(main, ["dedup", "--input", str(source), "--output", str(target)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {source}{message}") and result.stderr.count("\n") == 1
    assert target.read_text() == "previous output\n"


def test_dedup_command_missing_input(tmp_path):
    result = CliRunner().invoke(main, ["dedup", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.stderr
