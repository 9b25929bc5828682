"""Reading a teacher's concept list out of free text.

The teacher is asked for a Python list of strings, and mostly writes one -- wrapped in prose, inside a
``` fence, after a reasoning block, with an apostrophe that breaks the quoting, or as a numbered list
instead. The rules, first usable one wins:

1. the last bracketed list (by where it ends; the outermost of lists ending together) that
   ast.literal_eval or json.loads reads as strings (one level of nesting is flattened);
2. the quoted items of the last bracketed list that starts with a quote but does not evaluate, e.g.
   ['Euler's formula', 'Vieta's formulas'];
3. the last block of consecutive numbered ("1." / "1)"), bulleted ("-", "*", "•") or quoted lines.

Items are cleaned (whitespace collapsed, surrounding quotes, markdown emphasis and trailing commas
removed), de-duplicated case-insensitively keeping the first spelling, and cut to `max_concepts`.
An answer with nothing usable gives [] for the caller to count and handle.
"""
from __future__ import annotations

import ast
import json
import re

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LIST_LINE_RE = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s+(.+?)\s*$")
_QUOTED_LINE_RE = re.compile(r"""^\s*(["'])(.+)\1\s*,?\s*$""")
_QUOTED_ITEM_SEPARATOR_RE = re.compile(r"""["']\s*,\s*["']""")


def parse_concepts(text: str, max_concepts: int | None = None) -> list[str]:
    """The concepts in a teacher's answer, cleaned and de-duplicated; [] when nothing usable."""
    text = _THINK_RE.sub("", text)
    spans = _bracketed_spans(text)
    for items in (_evaluated_list(text, spans), _quoted_items(text, spans), _line_items(text)):
        concepts = _clean(items or [])
        if concepts:
            return concepts[:max_concepts] if max_concepts is not None else concepts
    return []


def _bracketed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every '[' ... matching ']' (end exclusive), latest ending first, outermost first.

    The match skips brackets inside quoted strings so "[0, 1)" in a concept does not end the list; when
    the quotes do not pair up (an apostrophe in prose) it falls back to counting brackets alone.
    """
    spans = set()
    for start, char in enumerate(text):
        if char != "[":
            continue
        end = _matching_bracket(text, start, quote_aware=True)
        if end is None:
            end = _matching_bracket(text, start, quote_aware=False)
        if end is not None:
            spans.add((start, end + 1))
    return sorted(spans, key=lambda span: (-span[1], span[0]))


def _matching_bracket(text: str, start: int, quote_aware: bool) -> int | None:
    depth, quote, i = 0, None, start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif quote_aware and char in "'\"":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _evaluated_list(text: str, spans: list[tuple[int, int]]) -> list[str] | None:
    for start, end in spans:
        for read in (ast.literal_eval, json.loads):
            try:
                value = read(text[start:end])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            items = _strings(value)
            if items is not None:
                return items
    return None


def _strings(value) -> list[str] | None:
    """The strings of a list (nested lists flattened once); None unless every element is a string."""
    if not isinstance(value, list):
        return None
    flat = [item for element in value for item in (element if isinstance(element, list) else [element])]
    if not flat or not all(isinstance(item, str) for item in flat):
        return None
    return flat


def _quoted_items(text: str, spans: list[tuple[int, int]]) -> list[str] | None:
    for start, end in spans:
        inner = text[start + 1 : end - 1].strip().rstrip(",").strip()
        if len(inner) >= 2 and inner[0] in "'\"" and inner[-1] in "'\"":
            return _QUOTED_ITEM_SEPARATOR_RE.split(inner[1:-1])
    return None


def _line_items(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        match = _LIST_LINE_RE.match(line) or _QUOTED_LINE_RE.match(line)
        if match:
            current.append(match.group(match.lastindex))
        elif line.strip():
            if current:
                blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks[-1] if blocks else []


def _clean(items: list[str]) -> list[str]:
    concepts, seen = [], set()
    for item in items:
        concept = " ".join(item.split())
        previous = None
        while concept != previous:
            previous = concept
            concept = concept.strip().rstrip(",;").strip()
            for mark in ("**", "__", "`", '"', "'"):
                if len(concept) >= 2 * len(mark) and concept.startswith(mark) and concept.endswith(mark):
                    concept = concept[len(mark) : -len(mark)]
        key = concept.casefold()
        if concept and key not in seen:
            seen.add(key)
            concepts.append(concept)
    return concepts
