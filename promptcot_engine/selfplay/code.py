"""Code answers: the last ```python block of a solution, run against parsed unit tests in the sandbox."""
from __future__ import annotations

import re
from dataclasses import dataclass

from promptcot_engine.errors import InputError
from promptcot_engine.selfplay.sandbox import run_python

_PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_KEPT_CHARS = 4096


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # a result, not a pytest test class

    passed: bool
    status: str  # "ok" | "wrong_answer" | "timeout" | "memory" | "runtime_error" | "blocked"
    stdout: str  # truncated to the first 4,096 characters
    stderr: str  # truncated to the last 4,096 characters, where the error is
    elapsed: float


def extract_code(text: str) -> str | None:
    """The last ```python (or ```py, ```python3) fenced block; None when there is none or it is empty."""
    blocks = _PYTHON_BLOCK.findall(text)
    if not blocks or not blocks[-1].strip():
        return None
    return blocks[-1]


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    return _normalized_lines(actual) == _normalized_lines(expected)


def run_tests(program: str, tests: list[dict], timeout: float = 5.0, memory_mb: int = 512) -> list[TestResult]:
    """Run `program` once per test, stdin = test["input"]; a test passes when stdout matches test["output"]."""
    for index, test in enumerate(tests):
        for field in ("input", "output"):
            if not isinstance(test, dict) or not isinstance(test.get(field), str):
                raise InputError(f"tests[{index}]: field {field!r} must be a string")
    results = []
    for test in tests:
        run = run_python(program, test["input"], timeout=timeout, memory_mb=memory_mb)
        status = run.status
        if status == "ok" and not outputs_match(run.stdout, test["output"]):
            status = "wrong_answer"
        results.append(TestResult(passed=status == "ok", status=status, stdout=run.stdout[:_KEPT_CHARS],
                                  stderr=run.stderr[-_KEPT_CHARS:], elapsed=run.elapsed))
    return results


def _normalized_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines
