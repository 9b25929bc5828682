"""Data parallelism for the generation and scoring stages under torchrun: each rank runs its own engine on
every world_size-th item of a chunk, and the results are gathered once, back in item order, on every rank.
A single process (no WORLD_SIZE > 1) runs everything itself."""
from __future__ import annotations

from collections.abc import Callable

import torch

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
