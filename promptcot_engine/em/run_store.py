"""The run directory: every stage's output written through a temporary file and an atomic rename, a record
of what is done, and chunked stages that resume part by part.

A stage that generates or scores works through its items in fixed chunks (chunk_size items, in a fixed
order) and writes each chunk's results as its own part file; after a kill -9 the rerun skips the parts that
exist, so no record is lost (every part is whole or absent) and none is duplicated (a chunk's part is
written once). Sampling is seeded per record, so a recomputed chunk gives the records it would have given.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import atomic_write_text, read_jsonl, write_jsonl
from promptcot_engine.em.sharding import Sharding


class RunStore:
    def __init__(self, run_dir: str | Path, sharding: Sharding | None = None):
        self.run_dir = Path(run_dir)
        self.sharding = sharding or Sharding()
        self.state_path = self.run_dir / "state.json"
        self.state = {"done": {}}
        if self.state_path.is_file():
            try:
                self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InputError(f"{self.state_path}: invalid JSON ({e.msg}); not a run directory of this engine?") from None
        if self.sharding.is_main and self.run_dir.is_dir():
            # a kill -9 between a temporary file's creation and its rename leaves it behind; nothing else writes
            # here while the job starts (the other ranks wait below), so any left is stale
            for stale in self.run_dir.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        self.sharding.barrier()

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def is_done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def info(self, stage: str) -> dict:
        return self.state["done"][stage]

    def mark_done(self, stage: str, **info) -> None:
        self.state["done"][stage] = info
        if self.sharding.is_main:
            atomic_write_text(self.state_path, json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        self.sharding.barrier()

    def write_jsonl(self, relative: str, records: list[dict]) -> Path:
        path = self.path(relative)
        if self.sharding.is_main:
            write_jsonl(path, records)
        self.sharding.barrier()
        return path

    def read_jsonl(self, relative: str) -> list[dict]:
        return read_jsonl(self.path(relative))

    def chunked(self, stage: str, items: list, work: Callable[[list], list[list[dict]]], chunk_size: int,
                desc: str = "") -> list[dict]:
        """Apply `work` (items -> one list of records per item) chunk by chunk, each chunk sharded over the
        ranks, and return every record in item order. Finished chunks are read back, not recomputed."""
        parts = self.path(stage, "parts")
        records: list[dict] = []
        for index, chunk in self.sharding.chunks(items, chunk_size, desc or stage):
            part = parts / f"part-{index:05d}.jsonl"
            if not part.is_file():
                per_item = self.sharding.map(work, chunk)
                if self.sharding.is_main:
                    write_jsonl(part, [r for item_records in per_item for r in item_records])
                self.sharding.barrier()
            records.extend(read_jsonl(part))
        return records

    def replace_dir(self, relative: str, write: Callable[[Path], None]) -> Path:
        """Write a directory (a checkpoint) in full under a temporary name, then rename it into place."""
        final = self.path(relative)
        if self.sharding.is_main:
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.sharding.barrier()
        return final
