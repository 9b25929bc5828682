"""Reading one teacher-written unit test, {"input": ..., "output": ...}, out of messy model output.

Teachers wrap the object in ```json fences or prose, use Python dict syntax (single quotes, trailing
commas), raw newlines inside strings, or give the input as a list of lines. The last readable object
with both keys wins, as the last \\boxed{} does for math: a model that revises itself writes the final
version last.
"""
from __future__ import annotations

import ast
import json
import re

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def parse_unit_test(text: str) -> dict | None:
    """{"input": str, "output": str} from the last readable object in `text`, or None."""
    candidates = [text, *_FENCE.findall(text), *_braced_spans(text)]
    for candidate in reversed(candidates):
        test = _as_unit_test(_read_object(candidate))
        if test is not None:
            return test
    return None


def _braced_spans(text: str) -> list[str]:
    """Outermost {...} spans, skipping braces inside quoted strings; a stray unclosed { is passed over."""
    spans, begin = [], 0
    while True:
        depth, start, quote, escaped = 0, 0, None, False
        for i in range(begin, len(text)):
            char = text[i]
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == quote:
                    quote = None
            elif char in "\"'" and depth > 0:
                quote = char
            elif char == "{":
                if depth == 0:
                    start = i
                depth += 1
            elif char == "}" and depth > 0:
                depth -= 1
                if depth == 0:
                    spans.append(text[start:i + 1])
        if depth == 0:
            return spans
        begin = start + 1


def _read_object(candidate: str):
    candidate = candidate.strip()
    try:
        return json.loads(candidate, strict=False)  # strict=False: raw newlines inside strings
    except ValueError:
        pass
    try:
        return ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _as_unit_test(value) -> dict | None:
    if not isinstance(value, dict):
        return None
    fields = {str(key).strip().lower(): field for key, field in value.items()}
    if "input" not in fields or "output" not in fields:
        return None
    test = {"input": _as_text(fields["input"]), "output": _as_text(fields["output"])}
    return None if None in test.values() else test


def _as_text(value) -> str | None:
    """Strings stay; numbers print; a list is one line per item (a nested list is one line, space-joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        lines = [_as_line(item) for item in value]
        return None if None in lines else "\n".join(lines)
    return None


def _as_line(item) -> str | None:
    if isinstance(item, (list, tuple)):
        words = [_as_text(word) for word in item]
        return None if None in words else " ".join(words)
    return _as_text(item)
