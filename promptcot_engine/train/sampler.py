"""Which examples each optimizer step, rank and micro-batch gets.

Every epoch is a fresh seeded permutation, cut into global batches of batch_size examples (the last one
may be shorter). Rank r takes every world_size-th example of the global batch and splits its share into
grad_accum micro-batches. A step's examples depend only on (seed, step), so a resumed run needs nothing
but the step number to continue exactly where it stopped, whatever the world size.
"""
from __future__ import annotations

import math

import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def step_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The global batch of optimizer step `step` (0-based)."""
    epoch, batch = divmod(step, steps_per_epoch(num_examples, batch_size))
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[batch * batch_size:(batch + 1) * batch_size].tolist()


def micro_batches(indices: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's share of a global batch in grad_accum micro-batches (some may be empty)."""
    return [part.tolist() for part in np.array_split(np.asarray(indices[rank::world_size], dtype=np.int64), grad_accum)]
