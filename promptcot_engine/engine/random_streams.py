"""Counter-based random numbers for sampling: the uniform number behind a sample's t-th token is a function of
(the sample's stream key, t) alone.

A seeded sample must draw the same tokens whatever else shares its batch. One torch.Generator per sample does
that, but costs a generator call and a copy per row per step: on a GPU, two kernel launches per row, several
milliseconds a step for the E-step's hundreds of seeded rows, longer than the step's own forward for a small
model. Here a step's numbers for all rows are one vectorized hash on the host and one copy to the device. The
hash is SplitMix64 (Steele, Lea and Flood, 2014): the t-th number of a stream is the SplitMix64 output at state
key + (t + 1) * golden gamma, and the key is itself a SplitMix64 output of (seed, sample index), so each
(seed, index) pair gets its own stream. The numbers do not depend on the device either.
"""
from __future__ import annotations

import hashlib

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, index: int) -> int:
    """The stream of sample `index` of a request seeded with `seed` (any Python int)."""
    seed_state, index = (np.array([v & _MASK64], dtype=np.uint64) for v in (seed, index))
    return int(_mix(_mix(seed_state + _GAMMA) + index * _GAMMA)[0])  # arrays: numpy wraps them silently


def uniform_draws(keys: list[int], counters: list[int]) -> np.ndarray:
    """The uniform number in [0, 1) of draw counters[i] of stream keys[i], float64, one per row."""
    state = np.array(keys, dtype=np.uint64) + (np.array(counters, dtype=np.uint64) + np.uint64(1)) * _GAMMA
    return (_mix(state) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def record_seed(base: int, *parts) -> int:
    """The request seed of one record (an E-step pair, a synthesis prompt, a line of a JSONL file) from a run's
    base seed and the record's identity: the record gets the same draws whatever batch, chunk or rank it lands
    in, so a resumed or sharded run samples what an uninterrupted single-process run samples, and two records
    never share a stream."""
    digest = hashlib.blake2b(repr((base, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
