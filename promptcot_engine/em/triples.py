"""Reading (c, z, x) triples from JSONL for the stage commands, with errors that name file and line."""
from __future__ import annotations

from pathlib import Path

from promptcot_engine.em.templates import DOMAINS
from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import iter_jsonl


def read_triples(path: str | Path, need_rationale: bool) -> list[dict]:
    """Records with "id", "problem", "concepts" (a non-empty list of strings), "level", "domain" and, when
    asked, "rationale"; other fields pass through."""
    triples, seen = [], {}
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        for field in ("id", "problem", "level") + (("rationale",) if need_rationale else ()):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise InputError(f"{where}: field {field!r} must be a non-empty string")
        concepts = record.get("concepts")
        if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise InputError(f"{where}: field 'concepts' must be a non-empty list of strings")
        record.setdefault("domain", "math")
        if record["domain"] not in DOMAINS:
            raise InputError(f"{where}: field 'domain' must be one of {', '.join(DOMAINS)}")
        if record["id"] in seen:
            raise InputError(f"{where}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
        seen[record["id"]] = line
        triples.append(record)
    if not triples:
        raise InputError(f"{path}: no records")
    return triples
