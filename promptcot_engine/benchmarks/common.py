"""Shared benchmark plumbing: the prompts, timing, peak-memory readings and result printing."""
from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager

import torch

BENCH_QUESTIONS = [
    "Prove that the sum of two odd integers is even.", "How many positive divisors does 360 have?",
    "Find all real x with x^2 - 5x + 6 = 0.", "What is the remainder when 2^100 is divided by 7?",
    "Explain the pigeonhole principle with an example.", "Compute the area of a triangle with sides 13, 14, 15.",
    "Write a Python function that checks whether a number is prime.", "What is the sum of the first 50 odd numbers?",
    "Describe a strategy to count lattice paths in a 5x5 grid.", "Why is the square root of 2 irrational?",
    "How many ways can 8 rooks be placed on a chessboard so none attack another?",
    "Solve the recurrence a_n = 3a_{n-1} - 2a_{n-2} with a_0 = 0, a_1 = 1.",
    "What is the probability of rolling a sum of 7 with two dice?", "Find the inradius of a 3-4-5 right triangle.",
    "State and prove the AM-GM inequality for two numbers.", "Write a function that returns the nth Fibonacci number.",
]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    questions = [BENCH_QUESTIONS[i % len(BENCH_QUESTIONS)] for i in range(count)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]


@contextmanager
def timed():
    """Yields a dict that holds 'seconds' once the block ends (CUDA work included)."""
    result = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield result
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - start


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(name: str, result: dict) -> str:
    lines = [f"== {name} =="]
    for key, value in result.items():
        lines.append(f"{key:>28}: {value:,.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)
