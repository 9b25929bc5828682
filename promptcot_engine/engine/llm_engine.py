"""LLMEngine: requests in, one scheduled forward per step, finished sequences out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from promptcot_engine.config import EngineConfig
from promptcot_engine.engine.block_manager import BlockManager
from promptcot_engine.engine.cpu_memory import retain_freed_memory
from promptcot_engine.engine.detokenizer import IncrementalDetokenizer
from promptcot_engine.engine.model_runner import ModelRunner
from promptcot_engine.engine.sampler import sample
from promptcot_engine.engine.scheduler import Scheduler
from promptcot_engine.engine.random_streams import stream_key, uniform_draws
from promptcot_engine.engine.sequence import Sequence, SequenceStatus
from promptcot_engine.engine.stats import EngineStats
from promptcot_engine.errors import InputError
from promptcot_engine.models.loader import load_model, resolve_device, resolve_dtype
from promptcot_engine.sampling_params import SamplingParams

_SCORING_PARAMS = SamplingParams(max_tokens=1)


@dataclass
class Request:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[int, Sequence] = field(default_factory=dict)  # sample index -> sequence
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == (1 if self.params is _SCORING_PARAMS else self.params.n)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            retain_freed_memory()
        self.model, self.checkpoint = load_model(config.model, self.dtype, self.device)
        self.tokenizer = self.checkpoint.tokenizer
        mc = self.model.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.runner = ModelRunner(self.model, config, self.device, self.dtype, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        eos = set(self.checkpoint.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.rng = np.random.default_rng(config.seed)  # the random streams of unseeded samples
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()

    # ---- requests ---------------------------------------------------------------------------------------
    def check_prompt(self, token_ids: list[int], kind: str, index: int, max_new_tokens: int) -> None:
        """kind and index name the prompt or pair in the error: "prompt 3", "pair 0"."""
        what = f"{kind} {index}"
        if not token_ids:
            raise InputError(f"{what} is empty", index)
        vocab = self.model.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"{what} has token id {bad}, outside the vocabulary [0, {vocab})", index)
        # a prompt needs room for at least one new token; a scored pair (no new token) may fill the context
        if len(token_ids) + min(max_new_tokens, 1) > self.max_model_len:
            room = " with room for one new token" if max_new_tokens else ""
            raise InputError(f"{what} has {len(token_ids)} tokens: longer than the model's context "
                             f"({self.max_model_len} tokens{room})", index)
        need = -(-min(len(token_ids) + max_new_tokens, self.max_model_len) // self.runner.block_size)
        if need > self.runner.num_blocks:
            raise InputError(f"{what} needs {need} KV blocks but the cache has {self.runner.num_blocks}; "
                             "raise kv_cache_memory_gb or lower max_tokens", index)

    def add_request(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(prompt_token_ids, "prompt", request_id, params.max_tokens)
        request = Request(request_id, list(prompt_token_ids), params)
        leader = self._new_sequence(request, 0)
        leader.num_pending_forks = params.n - 1
        self.requests[request_id] = request
        self.scheduler.add(leader)

    def add_score_request(self, request_id: int, token_ids: list[int], score_start: int) -> None:
        """Teacher-forced log-probs of token_ids[score_start:] given everything before each token."""
        self.check_prompt(token_ids, "pair", request_id, 0)
        request = Request(request_id, list(token_ids), _SCORING_PARAMS)
        seq = Sequence(token_ids, _SCORING_PARAMS, request_id, 0, score_start=score_start)
        request.seqs[0] = seq
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, index: int, parent: Sequence | None = None) -> Sequence:
        seq = parent.fork(index) if parent else Sequence(request.prompt_token_ids, request.params, request.request_id, index)
        seed = request.params.seed
        seq.random_key = (stream_key(seed, index) if seed is not None
                          else int(self.rng.bit_generator.random_raw()))
        # text while running is only needed to find stop strings; the final text is decoded once at finish
        if request.params.stop:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.params.skip_special_tokens)
        request.seqs[index] = seq
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def pop_finished(self) -> list[Request]:
        done = [r for r in self.requests.values() if r.finished]
        for r in done:
            del self.requests[r.request_id]
        return done

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler found nothing to run while requests are pending")
        sample_seqs, logits, scores = self.runner.run(batch)
        stats = self.stats
        if batch.is_prefill:
            stats.prefill_steps += 1
            stats.prefilled_tokens += sum(batch.num_new_tokens)
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n
                self.block_manager.mark_computed(seq)
                if seq.is_scoring:
                    logprobs, is_argmax = scores.get(seq.seq_id, ([], []))
                    seq.score_logprobs += logprobs
                    seq.score_is_argmax += is_argmax
                    if seq.num_computed_tokens == seq.num_tokens:
                        self._finish(seq, "stop", None)
        else:  # one token for each sequence, none of them scoring (scoring finishes with its prefill)
            stats.decode_steps += 1
            block_size, context_tokens = self.runner.block_size, 0
            for seq in batch.seqs:
                seq.num_computed_tokens += 1
                context_tokens += seq.num_computed_tokens
                if seq.num_computed_tokens % block_size == 0:  # a block just filled: register it for reuse
                    self.block_manager.mark_computed(seq)
            stats.decode_context_tokens += context_tokens
        if sample_seqs:
            self._sample(sample_seqs, logits, batch.is_prefill)  # reads the sampled tokens: waits for the device
        if self.device.type == "cuda":  # a step with nothing to read back has only queued its kernels
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if batch.is_prefill:
            stats.prefill_seconds += elapsed
        else:
            stats.decode_seconds += elapsed

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, newly_prefilled: bool) -> None:
        rows, all_seqs = [], []
        for row, seq in enumerate(seqs):
            rows.append(row)
            all_seqs.append(seq)
            if seq.num_pending_forks:
                for child in self._fork(seq):
                    rows.append(row)  # siblings draw their first token from the same prompt logits
                    all_seqs.append(child)
        if len(rows) != len(seqs):
            logits = logits[rows]
        params = [s.params for s in all_seqs]
        if any(p.min_tokens for p in params):
            self._suppress_stop_before_min_tokens(logits, all_seqs)
        uniform = None
        if not all(p.greedy for p in params):  # each row's next number from its own stream, one copy for all
            uniform = torch.from_numpy(uniform_draws([s.random_key for s in all_seqs],
                                                     [s.num_output_tokens for s in all_seqs])).to(logits.device)
        tokens, logprobs = sample(logits, params, uniform, want_logprobs=any(p.logprobs for p in params),
                                  cpu_kernel=self.config.cpu_kernels)
        # one device-to-host copy each: indexing a CUDA tensor per row would wait on the device once per row
        token_logprobs = [None] * len(all_seqs) if logprobs is None else logprobs.tolist()
        self.stats.generated_tokens += len(all_seqs)
        for seq, token, logprob in zip(all_seqs, tokens.tolist(), token_logprobs):
            self._append_token(seq, token, logprob)
            if newly_prefilled and seq.status == SequenceStatus.RUNNING:
                self.scheduler.admit_prefilled(seq)

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """The request's other n - 1 samples, sharing the leader's prefilled prompt blocks."""
        request = self.requests[leader.request_id]
        children, copies = [], []
        for index in range(1, leader.num_pending_forks + 1):
            child = self._new_sequence(request, index, parent=leader)
            if self.block_manager.can_fork(leader, 1):
                copy = self.block_manager.fork(leader, child)
                if copy:
                    copies.append(copy)
                child.status = SequenceStatus.RUNNING
                children.append(child)
            else:  # no room to copy the partial block now: prefill later, reusing the cached full blocks
                child.status, child.num_computed_tokens, child.num_cached_tokens = SequenceStatus.WAITING, 0, 0
                self.scheduler.add(child)
        leader.num_pending_forks = 0
        self.runner.copy_blocks(copies)
        return children

    def _suppress_stop_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")

    def _append_token(self, seq: Sequence, token: int, logprob: float | None) -> None:
        """Per sequence per step: host time a GPU waits through, hence the lengths read once."""
        p = seq.params
        token_ids = seq.token_ids
        token_ids.append(token)
        num_output = len(token_ids) - seq.num_prompt_tokens
        if p.logprobs:
            seq.output_logprobs.append(logprob)
        new_text = ""
        if seq.detokenizer:
            new_text = seq.detokenizer.add(token)
            seq.text += new_text
        if num_output >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop", None)
            if token in p.stop_token_ids:
                return self._finish(seq, "stop", token)
            if new_text and self._truncate_at_stop_string(seq, len(new_text)):
                return None
        if num_output >= p.max_tokens or len(token_ids) >= self.max_model_len:
            self._finish(seq, "length", None)

    def _truncate_at_stop_string(self, seq: Sequence, new_chars: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - new_chars - longest + 1)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index]
        self._finish(seq, "stop", stop, text_final=True)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason, text_final: bool = False) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if not seq.is_scoring and not text_final:
            seq.text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        self.scheduler.finish(seq)
        self.runner.block_tables.release(seq.seq_id)
        self.requests[seq.request_id].num_finished += 1

    # ---- weights --------------------------------------------------------------------------------------------
    def load_weights(self, named_tensors, source: str) -> None:
        from promptcot_engine.models.weights import load_weights

        if self.has_unfinished():
            raise RuntimeError("load_weights while requests are running")
        load_weights(self.model, named_tensors, source)
        self.block_manager.reset_prefix_cache()  # cached KV was computed with the old weights
