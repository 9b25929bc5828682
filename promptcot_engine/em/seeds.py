"""Seed problems: the (c, x) pairs the EM loop starts from.

A seed is a dict with exactly these keys (absent optional values are None):
    id       str, unique within the seed set
    problem  str, the problem statement x
    concepts list[str] | None   (None or [] in a file: the teacher annotates them)
    level    str | None         (the teacher classifies math seeds when None)
    answer   str | None         (numbers in a JSONL file are kept as their text)
    domain   "math" | "code"
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from promptcot_engine.em.templates import DOMAINS
from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import iter_jsonl

CHAMP = "champ"


def _seed(
    seed_id: str, problem: str, concepts: list[str] | None = None, level: str | None = None,
    answer: str | None = None, domain: str = "math",
) -> dict:
    return {"id": seed_id, "problem": problem, "concepts": concepts, "level": level, "answer": answer, "domain": domain}


def load_champ_seeds(limit: int | None = None) -> list[dict]:
    """The 270 CHAMP competition problems shipped in the champ-dataset package, in natural id order
    (P_Combinatorics_1, P_Combinatorics_2, ..., P_Combinatorics_10, ...), without concepts or level.

    The package's JSON file is read directly: importing champ_dataset would need natsort.
    """
    _check_limit(limit)
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("seed set 'champ' needs the champ-dataset package: pip install champ-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / "v0.json"
    with path.open(encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    seeds = [
        _seed(f"{CHAMP}/{identifier}", problem=problem["_text"], answer=problem["_answer"])
        for identifier, problem in sorted(problems.items(), key=lambda item: _natural_key(item[0]))
    ]
    return seeds[:limit]


def _natural_key(identifier: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", identifier)]


def load_seeds_jsonl(path: str | os.PathLike) -> list[dict]:
    """Seeds from a JSONL file, validated line by line; a missing id becomes "<file stem>/<line>"."""
    path = Path(path)
    seeds, first_line_of = [], {}
    for line_number, record in iter_jsonl(path):
        seed = _seed_from_record(record, f"{path}:{line_number}", default_id=f"{path.stem}/{line_number}")
        if seed["id"] in first_line_of:
            raise InputError(
                f"{path}:{line_number}: duplicate id {seed['id']!r} (first on line {first_line_of[seed['id']]})"
            )
        first_line_of[seed["id"]] = line_number
        seeds.append(seed)
    if not seeds:
        raise InputError(f"{path}: no seed problems")
    return seeds


def _seed_from_record(record: dict, where: str, default_id: str) -> dict:
    seed_id = record.get("id", default_id)
    if not isinstance(seed_id, str) or not seed_id.strip():
        raise InputError(f"{where}: field 'id' must be a non-empty string, got {seed_id!r}")
    problem = record.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise InputError(f"{where}: field 'problem' must be a non-empty string, got {problem!r}")
    concepts = record.get("concepts")
    if concepts is not None:
        if not isinstance(concepts, list):
            raise InputError(f"{where}: field 'concepts' must be a list of strings, got {type(concepts).__name__}")
        for i, concept in enumerate(concepts):
            if not isinstance(concept, str) or not concept.strip():
                raise InputError(f"{where}: field 'concepts'[{i}] must be a non-empty string, got {concept!r}")
    level = record.get("level")
    if level is not None and (not isinstance(level, str) or not level.strip()):
        raise InputError(f"{where}: field 'level' must be a non-empty string, got {level!r}")
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise InputError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
    domain = record.get("domain", "math")
    if domain not in DOMAINS:
        raise InputError(f"{where}: field 'domain' must be one of {DOMAINS}, got {domain!r}")
    return _seed(seed_id, problem, concepts or None, level, answer, domain)


def load_seeds(spec: str, limit: int | None = None) -> list[dict]:
    """`spec` is "champ" (the packaged CHAMP problems) or the path of a seed JSONL file."""
    _check_limit(limit)
    if spec == CHAMP:
        return load_champ_seeds(limit)
    return load_seeds_jsonl(spec)[:limit]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"limit: expected a positive integer or None, got {limit!r}")
