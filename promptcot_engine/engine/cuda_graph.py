"""Decode steps replayed from CUDA graphs.

A decode step of a small model is dominated by kernel-launch overhead (hundreds of small kernels per
token). Graphs are captured once per batch-size bucket over static input buffers; a step copies its inputs
into the buffers of the smallest bucket that holds it and replays. Padding rows get slot -1 (nothing is
stored) and a context of one token, and their outputs are dropped.
"""
from __future__ import annotations

import torch

from promptcot_engine.attention.paged import AttentionMetadata, PagedAttention


class StaticDecodeInputs:
    """The fixed buffers a captured decode step reads, per batch-size bucket, and the padding of a smaller
    batch into them (kept apart from the capture so that it can be run eagerly, on any device)."""

    def __init__(self, runner, max_batch_size: int):
        self.runner = runner
        device = runner.device
        sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16)) + [max_batch_size]
        self.batch_sizes = sorted(set(sizes))
        max_bs = self.batch_sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                                 context_lens=self.context_lens[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
                                 max_seqlen_q=1, max_context_len=self.max_blocks * self.runner.block_size,
                                 has_cached_context=True)

    def forward(self, bs: int) -> torch.Tensor:
        """The decode step of the bucket of bs rows over the buffers (what a graph captures)."""
        runner = self.runner
        attention = PagedAttention(runner.kv_caches, self._metadata(bs), runner.backend, runner.scale)
        return runner.model(self.input_ids[:bs], self.positions[:bs], attention)

    def can_run(self, batch_size: int, metadata: AttentionMetadata) -> bool:
        return batch_size <= self.batch_sizes[-1] and metadata.block_tables.shape[1] <= self.max_blocks

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> int:
        """Copy a batch of n sequences into the buffers of the smallest bucket that holds it; return that size."""
        n = input_ids.shape[0]
        bs = next(s for s in self.batch_sizes if s >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:bs] = -1
        self.slot_mapping[:n] = metadata.slot_mapping
        self.context_lens[:bs] = 1
        self.context_lens[:n] = metadata.context_lens
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width] = metadata.block_tables
        return bs


class DecodeCUDAGraphs(StaticDecodeInputs):
    def __init__(self, runner, max_batch_size: int):
        super().__init__(runner, max_batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
                self.forward(bs)  # warm-up: autotuning, lazy init
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.outputs[bs] = self.forward(bs)
                pool = pool or graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(runner.device)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        bs = self.stage(input_ids, positions, metadata)
        self.graphs[bs].replay()
        return self.outputs[bs][:input_ids.shape[0]]
