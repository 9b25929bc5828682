"""Per-record sampling seeds: the same record gets the same draws whatever batch, chunk or rank it lands in,
so a resumed or sharded run samples exactly what an uninterrupted single-process run samples."""
from __future__ import annotations

import hashlib


def record_seed(base: int, *parts) -> int:
    digest = hashlib.blake2b(repr((base, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
