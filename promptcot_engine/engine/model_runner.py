"""ModelRunner: owns the model and the paged KV cache, turns a scheduled batch into one forward pass, and
returns what the engine needs from it: next-token logits for sequences that reached their last token, and
teacher-forced log-probs for scored positions (never a [tokens, vocab] tensor for the whole batch)."""
from __future__ import annotations

import os

import numpy as np
import torch

from promptcot_engine.attention.paged import AttentionMetadata, PagedAttention
from promptcot_engine.attention.shared_prefix import plan_shared_prefix
from promptcot_engine.attention.varlen import FLASH_DTYPES, flash_attn_available
from promptcot_engine.config import EngineConfig
from promptcot_engine.engine.block_tables import BlockTables
from promptcot_engine.engine.cpu_memory import advise_huge_pages
from promptcot_engine.engine.scheduler import ScheduledBatch
from promptcot_engine.engine.sequence import Sequence
from promptcot_engine.errors import InputError
from promptcot_engine.kernels.cpu_linear import use_onednn_linear
from promptcot_engine.kernels.cpu_layer_ops import use_cpu_layer_kernels
from promptcot_engine.kernels.cpu_paged_attention import cpu_attention_kernels_apply
from promptcot_engine.kernels.fused_logprob import linear_logprob
from promptcot_engine.kernels.paged_attention import PagedGather, PagedPrefill
from promptcot_engine.models.decoder import DecoderForCausalLM

GiB = 1 << 30
CPU_DEFAULT_KV_GB = 2.0


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype, block_size: int | None) -> str:
    """flash-attn takes fp16/bf16 only and paged blocks of a multiple of 256 tokens: `auto` picks it only then."""
    flash_fits = dtype in FLASH_DTYPES and (block_size is None or block_size % 256 == 0)
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        return "flash" if flash_attn_available(device) and flash_fits else "triton"
    # Triton's interpreter runs the kernels on CPU tensors: slow, but the GPU decode path end to end (tests)
    interpreted = requested == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if requested in ("flash", "triton") and device.type != "cuda" and not interpreted:
        raise InputError(f"attention_backend={requested!r} needs a CUDA device (device is {device})")
    if requested == "flash":
        if not flash_attn_available(device):
            raise InputError("attention_backend='flash' needs flash-attn: "
                             "pip install --no-build-isolation 'flash-attn>=2.6'")
        if not flash_fits:
            raise InputError(f"attention_backend='flash' needs dtype float16 or bfloat16 (got {dtype}) and a "
                             f"block_size that is a multiple of 256 (got {block_size})")
    return requested


def cuda_kv_cache_budget(total: int, free: int, utilization: float, weights: int, activations: int) -> int:
    """gpu_memory_utilization is this engine's share of the device, as in vLLM: the KV cache gets that share
    less the engine's own weights and activations, so that a second engine in the same process (the EM loop's
    q and p) gets its own share rather than what the first one left. Never more than is free beside the
    activations, which the steps allocate again after the cache."""
    return int(min(total * utilization - weights - activations, free - activations))


def available_cpu_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.model = model
        self.max_model_len = max_model_len
        self.config = config
        self.device = device
        self.dtype = dtype
        mc = model.config
        self.backend = resolve_attention_backend(config.attention_backend, device, dtype, config.block_size)
        self.block_size = config.block_size or (256 if self.backend == "flash" else 16)
        self.scale = mc.head_dim ** -0.5
        if device.type == "cpu":
            use_onednn_linear(model)  # the engine's model only runs inference: its products go to oneDNN
            if config.cpu_kernels:
                use_cpu_layer_kernels(model)  # and its norms and rotary to the C kernels
        self.kv_caches = self._allocate_kv_cache()
        self.block_tables = BlockTables(max_blocks_per_seq=-(-max_model_len // self.block_size))
        # attention on CPU (decode and prefill): the C kernels read the paged cache where they are built and
        # take the model's shapes
        self.cpu_attention_kernels = (self.backend == "torch" and config.cpu_kernels
                                      and cpu_attention_kernels_apply(self.kv_cache[0, 0, 0], self.kv_cache[0, 0]))
        self.cuda_graphs = None
        # the torch backend plans its decode from the block tables on the host each step: nothing to capture
        if self.backend in ("triton", "flash") and device.type == "cuda" and not config.enforce_eager:
            from promptcot_engine.engine.cuda_graph import DecodeCUDAGraphs

            self.cuda_graphs = DecodeCUDAGraphs(self, max_batch_size=config.max_num_seqs)

    # ---- KV cache -----------------------------------------------------------------------------------------
    def _kv_bytes_per_block(self) -> int:
        mc = self.model.config
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim * element

    def _kv_budget_bytes(self) -> int:
        if self.config.kv_cache_memory_gb is not None:
            return int(self.config.kv_cache_memory_gb * GiB)
        if self.device.type == "cuda":
            return self._profile_cuda_budget()
        return int(min(CPU_DEFAULT_KV_GB * GiB, 0.25 * available_cpu_memory()))

    def _profile_cuda_budget(self) -> int:
        """The KV cache's bytes on CUDA: see cuda_kv_cache_budget; the activations are those of the largest
        prefill, measured by running it."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)  # this engine's weights, and anything else in the process
        tokens = min(self.config.max_num_batched_tokens, self.model.config.max_position_embeddings)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        from promptcot_engine.attention.varlen import VarlenCausalAttention

        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(tokens, device=self.device),
                                VarlenCausalAttention(torch.tensor([0, tokens], dtype=torch.int32, device=self.device)))
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        del hidden
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()  # the profiling pass's blocks go back to the device, for the KV cache to take
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return cuda_kv_cache_budget(total, free, self.config.gpu_memory_utilization, weights, activations)

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mc = self.model.config
        # never more blocks than max_num_seqs full-length sequences can use: a small model's budget would
        # otherwise mean millions of blocks, each a Python object in the block manager
        useful = -(-self.config.max_num_seqs * self.max_model_len // self.block_size)
        self.num_blocks = self.config.num_kv_blocks or min(useful, self._kv_budget_bytes() // self._kv_bytes_per_block())
        if self.num_blocks < 1:
            setting = ("kv_cache_memory_gb" if self.config.kv_cache_memory_gb is not None or self.device.type != "cuda"
                       else "gpu_memory_utilization")
            raise InputError(f"{setting}: the KV cache budget holds no block of {self.block_size} tokens "
                             f"({self._kv_bytes_per_block() / GiB:.3f} GiB each); raise it")
        cache = torch.empty(2, mc.num_hidden_layers, self.num_blocks, self.block_size, mc.num_key_value_heads,
                            mc.head_dim, dtype=self.dtype, device=self.device)
        advise_huge_pages(cache)  # on CPU, before the pages are touched
        cache.zero_()
        self.kv_cache = cache
        return [(cache[0, layer], cache[1, layer]) for layer in range(mc.num_hidden_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    # ---- one step -----------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's inputs, built with numpy over the persistent block tables: per-token Python here is host
        time the device waits through at every decode step."""
        bs, seqs = self.block_size, batch.seqs
        q_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=len(seqs))
        context_lens = starts + q_lens
        rows = self.block_tables.rows(seqs)
        cu_seqlens_q = np.concatenate(([0], np.cumsum(q_lens)))
        if batch.is_prefill:
            input_ids = []
            for seq, start, n in zip(seqs, starts.tolist(), batch.num_new_tokens):
                input_ids += seq.token_ids[start:start + n]
            token_seq = np.repeat(np.arange(len(seqs)), q_lens)  # which sequence each token belongs to
            positions = np.arange(cu_seqlens_q[-1]) - cu_seqlens_q[token_seq] + starts[token_seq]
            token_rows = rows[token_seq]
        else:  # one token per sequence: its newest
            input_ids = [seq.token_ids[-1] for seq in seqs]
            positions, token_rows = starts, rows
        dev = self.device

        def to_device(array: np.ndarray, dtype: type) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(dev)

        metadata = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=to_device(self.block_tables.slots(token_rows, positions, bs), np.int64),
            block_tables=to_device(self.block_tables.gather(rows), np.int32),
            context_lens=to_device(context_lens, np.int32),
            cu_seqlens_q=to_device(cu_seqlens_q, np.int32),
            max_seqlen_q=int(q_lens.max()),
            max_context_len=int(context_lens.max()),
            has_cached_context=bool((context_lens != q_lens).any()),
            cpu_kernels=self.cpu_attention_kernels,
        )
        if batch.is_prefill and metadata.has_cached_context and self.backend == "torch" and not metadata.cpu_kernels:
            metadata.paged_prefill = PagedPrefill.plan(metadata.cu_seqlens_q, metadata.block_tables,
                                                       metadata.context_lens, bs, metadata.max_seqlen_q)
        if not batch.is_prefill and self.backend == "torch" and not metadata.cpu_kernels:
            metadata.shared_prefix = plan_shared_prefix([s.block_table for s in seqs], context_lens.tolist(), bs, dev,
                                                         self.dtype)
            if metadata.shared_prefix is None:
                metadata.paged_gather = PagedGather.plan(metadata.block_tables, metadata.context_lens, bs)
        return torch.tensor(input_ids, dtype=torch.long, device=dev), to_device(positions, np.int64), metadata

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None, dict[int, tuple[list[float], list[bool]]]]:
        """Forward the batch. Returns (sequences to sample for, their next-token logits [S, V] in the model's dtype,
        {seq_id: (log-probs, is-argmax)} for the scored positions computed in this step)."""
        input_ids, positions, metadata = self.prepare(batch)
        if not batch.is_prefill and self.cuda_graphs is not None and self.cuda_graphs.can_run(len(batch.seqs), metadata):
            hidden = self.cuda_graphs.run(input_ids, positions, metadata)
        else:
            hidden = self.model(input_ids, positions, PagedAttention(self.kv_caches, metadata, self.backend, self.scale))
        if not batch.is_prefill:  # every row samples (scoring sequences finish with their prefill)
            return list(batch.seqs), self.model.compute_logits(hidden), {}

        sample_seqs, sample_rows, score_rows, score_targets, score_owner = [], [], [], [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if seq.is_scoring:
                # hidden at position p predicts token p + 1; wanted for targets score_start .. num_tokens - 1
                first, last = max(start, seq.score_start - 1), min(end, seq.num_tokens - 1)
                for p in range(first, last):
                    score_rows.append(offset + p - start)
                    score_targets.append(seq.token_ids[p + 1])
                    score_owner.append(seq.seq_id)
            elif end == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(offset + n - 1)
            offset += n

        logits = None
        if sample_rows:
            # in the model's dtype: the sampler widens what it processes (bf16 widens exactly); on CPU its C
            # draw reads bf16 as it is, without a [rows, vocab] fp32 copy per step
            logits = self.model.compute_logits(hidden[sample_rows])
        scores: dict[int, tuple[list[float], list[bool]]] = {}
        if score_rows:
            logprobs, is_argmax = linear_logprob(hidden[score_rows], self.model.lm_head.weight,
                                                 torch.tensor(score_targets, device=self.device))
            for owner, lp, am in zip(score_owner, logprobs.tolist(), is_argmax.tolist()):
                entry = scores.setdefault(owner, ([], []))
                entry[0].append(lp)
                entry[1].append(am)
        return sample_seqs, logits, scores
