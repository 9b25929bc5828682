"""LLM: the offline entry point (vLLM's names): generate, chat, score, load_weights."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence as SequenceABC
from pathlib import Path

import torch
from tqdm.auto import tqdm

from promptcot_engine.config import EngineConfig
from promptcot_engine.engine.llm_engine import LLMEngine, Request
from promptcot_engine.engine.outputs import CompletionOutput, RequestOutput, ScoreOutput
from promptcot_engine.errors import InputError
from promptcot_engine.sampling_params import SamplingParams

Segment = str | list[int]


class LLM:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, block_size: int | None = None,
                 kv_cache_memory_gb: float | None = None, **engine_options):
        self.config = EngineConfig(model=str(model), dtype=dtype, device=device, seed=seed, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                                   kv_cache_memory_gb=kv_cache_memory_gb, **engine_options)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    # ---- generate -----------------------------------------------------------------------------------------
    def generate(self, prompts: str | dict | list[str | list[int] | dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = [_unwrap_prompt(p) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise InputError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        token_ids = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(token_ids, params)):  # all checked before any work starts
            self.engine.check_prompt(ids, "prompt", i, p.max_tokens)
        for i, (ids, p) in enumerate(zip(token_ids, params)):
            self.engine.add_request(i, ids, p)
        finished = self._run(len(prompts), use_tqdm, "generate")
        return [self._request_output(finished[i], prompts[i]) for i in range(len(prompts))]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """`generate` over conversations (one, or a list of them) rendered with the model's chat template and
        tokenized as transformers tokenizes a chat: the template writes its own special tokens."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts, token_ids = [], []
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
                raise InputError(f"conversation {i}: expected a list of {{role, content}} messages", i)
            text, ids = self.tokenizer.chat_prompt(conversation, f"conversation {i}", add_generation_prompt)
            texts.append(text)
            token_ids.append(ids)
        outputs = self.generate(token_ids, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def _prompt_ids(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt)
        if isinstance(prompt, SequenceABC) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise InputError(f"prompt {index}: expected a string or a list of token ids, got {type(prompt).__name__}",
                         index)

    @staticmethod
    def _request_output(request: Request, prompt) -> RequestOutput:
        outputs = []
        for index in sorted(request.seqs):
            seq = request.seqs[index]
            outputs.append(CompletionOutput(index=index, text=seq.text, token_ids=seq.output_token_ids,
                                            logprobs=seq.output_logprobs if request.params.logprobs else None,
                                            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, prompt if isinstance(prompt, str) else None,
                             request.prompt_token_ids, outputs)

    def _run(self, num_requests: int, use_tqdm: bool, what: str) -> dict[int, Request]:
        finished: dict[int, Request] = {}
        engine = self.engine
        start_tokens = engine.stats.generated_tokens + engine.stats.prefilled_tokens
        start = time.perf_counter()
        with tqdm(total=num_requests, desc=what, unit="req", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while engine.has_unfinished():
                engine.step()
                done = engine.pop_finished()
                for request in done:
                    finished[request.request_id] = request
                if done or bar.n == 0:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    tokens = engine.stats.generated_tokens + engine.stats.prefilled_tokens - start_tokens
                    bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
                    bar.update(len(done))
        return finished

    # ---- score --------------------------------------------------------------------------------------------
    def score(self, contexts: list[Segment], continuations: list[Segment | list[Segment]],
              use_tqdm: bool = True) -> list[ScoreOutput]:
        """Teacher-forced log-likelihood of each continuation given its context. A continuation given as a
        list of segments (strings or id lists) is tokenized segment by segment and gets one sum per segment."""
        contexts, continuations = list(contexts), list(continuations)
        if len(contexts) != len(continuations):
            raise InputError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
        pairs = [self._pair_ids(c, x, i) for i, (c, x) in enumerate(zip(contexts, continuations))]
        for i, (context_ids, segments) in enumerate(pairs):
            self.engine.check_prompt(context_ids + [t for s in segments for t in s], "pair", i, 0)

        results: dict[int, Request] = {}
        for wave in self._score_waves([tuple(c) for c, _ in pairs]):
            for i in wave:
                context_ids, segments = pairs[i]
                self.engine.add_score_request(i, context_ids + [t for s in segments for t in s], len(context_ids))
            results.update(self._run(len(wave), use_tqdm, "score"))
        outputs = []
        for i, (context_ids, segments) in enumerate(pairs):
            seq = results[i].seqs[0]
            lengths = [len(s) for s in segments]
            logprobs = seq.score_logprobs
            sums, offset = [], 0
            for n in lengths:
                sums.append(float(sum(logprobs[offset:offset + n])))
                offset += n
            segmented = _is_segmented(continuations[i])
            outputs.append(ScoreOutput(token_ids=[t for s in segments for t in s], token_logprobs=logprobs,
                                       logprob_sum=float(sum(logprobs)), is_greedy=all(seq.score_is_argmax),
                                       segment_logprob_sums=sums if segmented else None,
                                       segment_lengths=lengths if segmented else None))
        return outputs

    def _pair_ids(self, context: Segment, continuation, index: int) -> tuple[list[int], list[list[int]]]:
        context_ids = self._segment_ids(context, index, is_context=True)
        segments = [self._segment_ids(s, index) for s in continuation] if _is_segmented(continuation) \
            else [self._segment_ids(continuation, index)]
        if not any(segments):
            raise InputError(f"pair {index}: empty continuation", index)
        if not context_ids:
            raise InputError(f"pair {index}: empty context (the first continuation token needs something before it)",
                             index)
        return context_ids, segments

    def _segment_ids(self, segment: Segment, index: int, is_context: bool = False) -> list[int]:
        if isinstance(segment, str):  # a context is a prompt; a continuation segment gets no special tokens
            return self.tokenizer.encode_prompt(segment) if is_context else self.tokenizer.encode(segment, False)
        if isinstance(segment, SequenceABC) and all(isinstance(t, int) for t in segment):
            return list(segment)
        raise InputError(f"pair {index}: expected a string or a list of token ids, got {type(segment).__name__}", index)

    def _score_waves(self, contexts: list[tuple[int, ...]]) -> Iterable[list[int]]:
        """Order the pairs so a shared context is computed once: for each group of contexts that fits in half
        the KV cache, first one pair per distinct context, then the rest, which hit the prefix cache."""
        groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        for i, c in enumerate(contexts):
            groups.setdefault(c, []).append(i)
        budget = self.engine.runner.num_blocks * self.engine.runner.block_size // 2
        chunk, used = [], 0
        for context, members in groups.items():
            if chunk and used + len(context) > budget:
                yield from _two_waves(chunk)
                chunk, used = [], 0
            chunk.append(members)
            used += len(context)
        if chunk:
            yield from _two_waves(chunk)

    # ---- weights ------------------------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """Swap in new weights (a state dict, a module, or a checkpoint path) without rebuilding the engine."""
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        if isinstance(weights, dict):
            self.engine.load_weights(weights.items(), "state_dict")
            return
        from promptcot_engine.models.loader import open_checkpoint

        checkpoint = open_checkpoint(weights)
        self.engine.load_weights(checkpoint.iter_weights(), str(checkpoint.path))


def _unwrap_prompt(prompt):
    """vLLM's TextPrompt and TokensPrompt ({"prompt": text}, {"prompt_token_ids": ids}) as the text or ids."""
    if isinstance(prompt, dict):
        for key in ("prompt_token_ids", "prompt"):
            if key in prompt:
                return prompt[key]
    return prompt


def _is_segmented(continuation) -> bool:
    return isinstance(continuation, list) and any(not isinstance(t, int) for t in continuation)


def _two_waves(groups: list[list[int]]) -> Iterable[list[int]]:
    first = [members[0] for members in groups]
    rest = [i for members in groups for i in members[1:]]
    yield first
    if rest:
        yield rest
