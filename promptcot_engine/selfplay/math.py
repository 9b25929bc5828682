"""Math answers: the last \\boxed{} of a solution, answer equivalence, and the majority-vote reference.

Equivalence is HF's math-verify (numbers, fractions, percentages, LaTeX clean-up, intervals, tuples and
sets, symbolic equality through sympy), with two spellings it does not read added here: scientific
notation (`1e3`) and an escaped dollar sign (`\\$5`).

Timeout. math-verify can run unbounded: `9^{9^{9^{9}}}` against `1000` never returns, and most of that
time is spent inside single C-level big-integer operations. Its own timeout is `signal.alarm`, which
works only on the main thread, replaces the caller's SIGALRM handler, and cannot interrupt a C call
anyway. So every comparison runs in a worker process (a fresh interpreter on pipes) and a call that
is not answered within `timeout` seconds kills that worker and counts as not equivalent. This works
from any thread: a caller only waits on a pipe. Idle workers are kept for reuse, one per concurrent
caller at most, and their start-up (importing sympy) is not charged to the timeout.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SCIENTIFIC = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_WORKER_START_SECONDS = 300.0


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\boxed x, or \\fbox{...}); None when absent, empty or unclosed."""
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    while start < len(text) and text[start] in " \t":
        start += 1
    if text.startswith("{", start):
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{" and text[end - 1] != "\\":
                depth += 1
            elif text[end] == "}" and text[end - 1] != "\\":
                depth -= 1
                if depth == 0:
                    content = text[start + 1:end].strip()
                    return content or None
        return None
    # `\boxed 42`: LaTeX would box one token; models mean the whole word.
    content = re.match(r"[^\s$]*", text[start:]).group(0)
    return content or None


def is_equivalent(a: str, b: str, timeout: float = 5.0) -> bool:
    """Whether two final answers denote the same value; False when either cannot be read or time runs out."""
    if a.strip() == b.strip():
        return True
    worker = _checkout_worker()
    answer = worker.ask(a, b, timeout)
    if answer is None:
        worker.kill()
    else:
        _checkin_worker(worker)
    return bool(answer)


def majority_vote(answers: list[str | None], timeout: float = 5.0) -> str | None:
    """The most frequent answer, equivalent spellings counted together; ties go to the earliest.

    Each answer joins the first earlier group whose first spelling is equivalent to it (equivalence is
    not transitive: 50% matches both 50 and 0.5). The winner is returned as its first spelling.
    """
    groups: list[list] = []  # [first spelling, count], in order of first occurrence
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if is_equivalent(group[0], answer, timeout=timeout):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    if not groups:
        return None
    return max(groups, key=lambda group: group[1])[0]  # max keeps the first of equal counts


class _Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from promptcot_engine.selfplay.math import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self._read_line(_WORKER_START_SECONDS) != "ready":
            self.kill()
            raise RuntimeError("the answer-equivalence worker did not start")

    def ask(self, a: str, b: str, timeout: float) -> bool | None:
        """The worker's verdict, or None when it did not answer in time (or died)."""
        try:
            self.process.stdin.write(json.dumps([a, b]) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return None
        line = self._read_line(timeout)
        return None if line is None else json.loads(line)

    def _read_line(self, timeout: float) -> str | None:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        return line.strip() if line else None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


_idle_workers: list[_Worker] = []
_idle_lock = threading.Lock()


def _checkout_worker() -> _Worker:
    with _idle_lock:
        if _idle_workers:
            return _idle_workers.pop()
    return _Worker()


def _checkin_worker(worker: _Worker) -> None:
    with _idle_lock:
        _idle_workers.append(worker)


@atexit.register
def _stop_idle_workers() -> None:
    # Reaped here rather than left to the garbage collector, which would warn about running children.
    with _idle_lock:
        while _idle_workers:
            _idle_workers.pop().kill()


def _serve() -> None:
    """Worker main loop: one JSON [a, b] per input line, one JSON bool per output line."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off
    print("ready", flush=True)
    for line in sys.stdin:
        a, b = json.loads(line)
        print(json.dumps(_verify_both_ways(a, b)), flush=True)


def _verify_both_ways(a: str, b: str) -> bool:
    from math_verify import verify

    first, second = _parse(a), _parse(b)
    if not first or not second:
        return False
    try:
        # math-verify reads its first argument as the gold answer (e.g. a gold 50% also accepts 50);
        # the order of a and b must not matter here.
        return verify(first, second, timeout_seconds=None) or verify(second, first, timeout_seconds=None)
    except Exception:
        return False


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> list:
    from math_verify import parse

    try:
        return parse(_as_latex(answer), parsing_timeout=None)
    except Exception:
        return []


def _as_latex(answer: str) -> str:
    answer = _SCIENTIFIC.sub(_expand_scientific, answer.replace("\\$", ""))
    return answer if "$" in answer else f"${answer}$"


def _expand_scientific(match: re.Match) -> str:
    try:
        return format(Decimal(f"{match.group(1)}e{match.group(2)}"), "f")
    except InvalidOperation:
        return match.group(0)
