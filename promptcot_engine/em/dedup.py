"""Dedup of synthesized problems, as the paper does it: exact duplicates, then near duplicates.

1. Exact: texts equal after collapsing whitespace.
2. Near: the word set of a text is its lowercased words with punctuation (and symbols) stripped, keeping words of
   length >= 4 that are not numbers. MinHash signatures (datasketch, 128 permutations, fixed seed) go
   through LSH with 50 bands x 2 rows; a candidate pair counts as a duplicate only when the exact
   Jaccard similarity of the two word sets is > 0.2.
The first occurrence wins: each record is compared with the records kept so far only. A text with an
empty word set (no long words) can only be an exact duplicate. LSH finds a pair with Jaccard s with
probability 1 - (1 - s^2)^50: 0.87 at s = 0.2, above 0.9999 from s = 0.5, so pairs just above the
threshold are sometimes missed, as in the paper's setting.
"""
from __future__ import annotations

import re

from datasketch import MinHash, MinHashLSH

from promptcot_engine.errors import InputError

NUM_PERM = 128
LSH_BANDS_ROWS = (50, 2)
JACCARD_THRESHOLD = 0.2
MIN_WORD_LENGTH = 4
MINHASH_SEED = 1

# Punctuation and symbols of any script ("$", "^", "—", "“"), and "_" which \w would keep.
_PUNCTUATION_RE = re.compile(r"[^\w\s]|_")


def word_set(text: str) -> frozenset[str]:
    words = _PUNCTUATION_RE.sub("", text.lower()).split()
    return frozenset(w for w in words if len(w) >= MIN_WORD_LENGTH and not w.isnumeric())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def dedup(records: list[dict], key: str = "problem") -> tuple[list[dict], dict]:
    """(kept records in input order, stats {"input", "kept", "exact_duplicates", "near_duplicates"})."""
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise InputError(f"record {index}: field {key!r} must be a string")

    unique, seen_texts = [], set()
    for record in records:
        normalized = " ".join(record[key].split())
        if normalized not in seen_texts:
            seen_texts.add(normalized)
            unique.append(record)

    word_sets = [word_set(record[key]) for record in unique]
    signatures = MinHash.generator(
        ([word.encode("utf-8") for word in words] for words in word_sets), num_perm=NUM_PERM, seed=MINHASH_SEED
    )
    lsh = MinHashLSH(num_perm=NUM_PERM, params=LSH_BANDS_ROWS)
    kept = []
    for index, (record, words, signature) in enumerate(zip(unique, word_sets, signatures)):
        if words:
            if any(jaccard(words, word_sets[other]) > JACCARD_THRESHOLD for other in lsh.query(signature)):
                continue
            lsh.insert(index, signature)
        kept.append(record)

    stats = {
        "input": len(records),
        "kept": len(kept),
        "exact_duplicates": len(records) - len(unique),
        "near_duplicates": len(unique) - len(kept),
    }
    return kept, stats
