"""Shared benchmark plumbing: the prompts, timing, peak-memory readings and result printing."""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from promptcot_engine.engine.cpu_memory import release_free_memory
from promptcot_engine.models.loader import resolve_device, resolve_dtype

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


def status_mb(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> float:
    """Reset this process's peak resident set (VmHWM) to the current one and return that, so a peak read
    later is the work's, not the model loading's (torch's CPU allocations are invisible to tracemalloc).
    Free memory the allocator keeps for reuse is released first, or the work would seem to need none of it."""
    release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


class PeakMemory:
    """Peak memory a block of work adds: the CUDA allocator's peak on GPU, the resident-set high-water
    mark on CPU. The CPU mark is per process, so each side of a comparison runs in its own process."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline_mb = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.baseline_mb = reset_peak_rss()

    def peak_extra_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb
        return status_mb("VmHWM") - self.baseline_mb


def side_main(doc: str, engine_side, transformers_side, *int_options: str) -> None:
    """The entry point of a benchmark's side process (what run_side starts): --side, --model, --device, --dtype
    and the benchmark's integer options, all required (run_side passes every one; the defaults live in the
    benchmark's run_*_bench and its command); prints the side's result as one JSON line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["engine", "transformers"], required=True)
    for name in ("model", "device", "dtype"):
        parser.add_argument("--" + name, required=True)
    for name in int_options:
        parser.add_argument("--" + name.replace("_", "-"), type=int, required=True)
    args = parser.parse_args()
    print(json.dumps((engine_side if args.side == "engine" else transformers_side)(args)))


def run_side(module: str, side: str, args: list[str]) -> dict:
    """Run one side of a benchmark as `python -m module --side side args...`; it prints a JSON line last. When it
    fails, the error carries the end of its stderr (the traceback)."""
    done = subprocess.run([sys.executable, "-m", module, "--side", side, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} side of {module} exited with status {done.returncode}:\n"
                           + "\n".join(done.stderr.strip().splitlines()[-30:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str = "auto", dtype: str = "auto") -> dict:
    """Where a benchmark ran, with the device and dtype its `auto` settings resolved to (the ratios differ by
    dtype: a figure without it cannot be compared)."""
    resolved = resolve_device(device)
    info = {"device": str(resolved), "dtype": str(resolve_dtype(dtype, resolved)).removeprefix("torch."),
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
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
