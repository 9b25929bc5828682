"""Data parallelism for the generation and scoring stages under torchrun: each rank runs its own engine on
every world_size-th item of a chunk, and the results are gathered once, back in item order, on every rank.
A single process (no WORLD_SIZE > 1) runs everything itself."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from promptcot_engine.train import distributed


class Sharding:
    def __init__(self, device: torch.device | None = None):
        self.ctx = distributed.init_distributed(device or torch.device("cpu"))

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def barrier(self) -> None:
        distributed.barrier(self.ctx)

    def map(self, work: Callable[[list], list], items: list) -> list:
        """work(items) returns one result per item; run it on this rank's share and gather all results."""
        mine = list(range(self.rank, len(items), self.world_size))
        results = work([items[i] for i in mine]) if mine else []
        gathered = distributed.all_gather_objects(list(zip(mine, results)), self.ctx)
        ordered = dict(pair for rank_results in gathered for pair in rank_results)
        return [ordered[i] for i in range(len(items))]

    def chunks(self, items: list, chunk_size: int, desc: str) -> Iterator[tuple[int, list]]:
        """(index, chunk) in order, with a progress bar (on the main rank) that counts each chunk once the
        caller is done with it."""
        with tqdm(total=len(items), desc=desc, unit="item", disable=not self.is_main, dynamic_ncols=True) as bar:
            for index, start in enumerate(range(0, len(items), chunk_size)):
                chunk = items[start:start + chunk_size]
                yield index, chunk
                bar.update(len(chunk))

    def map_chunks(self, work: Callable[[list], list[list[dict]]], items: list, chunk_size: int, desc: str) -> list[dict]:
        """`map` chunk by chunk with a progress bar; work returns a list of records per item, flattened here."""
        records = []
        for _, chunk in self.chunks(items, chunk_size, desc):
            records += [r for item_records in self.map(work, chunk) for r in item_records]
        return records
