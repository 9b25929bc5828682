"""LLM.generate against transformers' greedy generate, and the engine's batching, caching and preemption
paths, which must not change a single token."""
import os

import pytest
import torch

from promptcot_engine import LLM, SamplingParams
from promptcot_engine.engine.cuda_graph import StaticDecodeInputs
from promptcot_engine.errors import InputError
from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from tests.reference import hf_model

MAX_NEW = 24


def mixed_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 5, 8, 13, 16, 17, 21, 30, 33, 47, 64, 100]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, eos_ids, max_new=MAX_NEW) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos_ids, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def engine_greedy(llm, prompts, max_new=MAX_NEW, one_at_a_time=False) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_new)
    if one_at_a_time:
        return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_runs():
    return {}


def test_greedy_matches_transformers(tiny_model_dir, reference_runs):
    llm = LLM(tiny_model_dir, dtype="float32", device="cpu", block_size=8, seed=0)
    assert llm.engine.runner.cpu_attention_kernels == CPU_KERNELS_AVAILABLE  # attention runs the C kernels when built
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    expected = hf_greedy(hf_model(tiny_model_dir), prompts, sorted(llm.engine.eos_token_ids))
    assert engine_greedy(llm, prompts) == expected
    assert engine_greedy(llm, prompts, one_at_a_time=True) == expected
    reference_runs[str(tiny_model_dir)] = (prompts, expected)


@pytest.mark.parametrize("variant", [
    dict(num_kv_blocks=24, block_size=8, max_num_seqs=16),  # forces preemption
    dict(enable_prefix_caching=False, block_size=8),
    dict(max_num_batched_tokens=7, block_size=4),  # every prompt prefilled in tiny chunks
    dict(max_num_seqs=3, block_size=16),
    dict(cpu_kernels=False, block_size=8),  # torch ops instead of the C kernels (decode on the batched torch path)
    dict(cpu_kernels=False, max_num_seqs=4, block_size=4),
])
def test_engine_paths_do_not_change_tokens(tiny_llama_dir, variant):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", **variant)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    expected = hf_greedy(hf_model(tiny_llama_dir), prompts, sorted(llm.engine.eos_token_ids))
    # generate twice: the second pass also runs through blocks cached by the first
    assert engine_greedy(llm, prompts) == expected
    assert engine_greedy(llm, prompts) == expected
    if variant.get("num_kv_blocks"):
        assert llm.engine.scheduler.num_preemptions > 0


interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels in Triton's interpreter, on CPU")


def triton_engine(model_dir, **engine_args) -> LLM:
    llm = LLM(model_dir, dtype="float32", device="cpu", attention_backend="triton", **engine_args)
    assert llm.engine.runner.backend == "triton" and llm.engine.runner.cuda_graphs is None
    return llm


@interpreted
def test_triton_backend_under_interpreter_matches_transformers(tiny_model_dir):
    """The GPU decode path (Triton KV store and paged decode, int32 block tables straight from the engine) on
    CPU tensors through Triton's interpreter: the engine's plumbing into the kernels, not only the kernels."""
    llm = triton_engine(tiny_model_dir)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    assert engine_greedy(llm, prompts) == hf_greedy(hf_model(tiny_model_dir), prompts, sorted(llm.engine.eos_token_ids))


@interpreted
def test_triton_backend_under_interpreter_with_preemption(tiny_llama_dir):
    llm = triton_engine(tiny_llama_dir, num_kv_blocks=24, block_size=8, max_num_seqs=16)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    assert engine_greedy(llm, prompts) == hf_greedy(hf_model(tiny_llama_dir), prompts, sorted(llm.engine.eos_token_ids))
    assert llm.engine.scheduler.num_preemptions > 0


@interpreted
def test_decode_graph_inputs_pad_without_changing_tokens(tiny_llama_dir):
    """What a CUDA-graph decode step does besides the replay: the batch copied into the fixed buffers of the
    smallest bucket that holds it, padding rows storing nothing and attending to one token, their outputs
    dropped. Here the captured step (the Triton kernels over those buffers) runs eagerly, in the interpreter,
    while the batch shrinks through the buckets (each sequence stops at its own max_tokens)."""
    class EagerGraphs(StaticDecodeInputs):
        buckets = set()

        def run(self, input_ids, positions, metadata):
            n, bs = input_ids.shape[0], self.stage(input_ids, positions, metadata)
            assert (self.slot_mapping[n:bs] == -1).all() and (self.context_lens[n:bs] == 1).all()
            self.buckets.add((n, bs))
            return self.forward(bs)[:n]

    llm = triton_engine(tiny_llama_dir)
    graphs = llm.engine.runner.cuda_graphs = EagerGraphs(llm.engine.runner, max_batch_size=16)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)  # 13 sequences: the bucket of 16
    lengths = [3 + i for i in range(len(prompts))]
    hf = hf_model(tiny_llama_dir)
    eos = sorted(llm.engine.eos_token_ids)
    expected = [hf_greedy(hf, [p], eos, max_new=m)[0] for p, m in zip(prompts, lengths)]
    outputs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in lengths], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert {bs for _, bs in graphs.buckets} >= {16, 8, 4} and any(n < bs for n, bs in graphs.buckets)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_dir):
    llm = LLM(smollm2_dir, dtype="float32", device="cpu")
    texts = ["What is the capital of France?", "Write a haiku about prime numbers.", "2 + 2 =",
             "def add(a, b):", "Explain gravity to a child in one sentence.", "List three colors:",
             "The derivative of x^2 is", "Once upon a time", "Translate 'cat' to French.", "Solve: 3x = 12. x =",
             "A prime number is", "Name a planet:"]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=True) for t in texts]
    expected = hf_greedy(hf_model(smollm2_dir), prompts, sorted(llm.engine.eos_token_ids), max_new=32)
    assert engine_greedy(llm, prompts, max_new=32) == expected
    assert engine_greedy(llm, prompts[:3], max_new=32, one_at_a_time=True) == expected[:3]


@pytest.mark.slow
def test_smollm2_bf16_decode_as_accurate_as_transformers_bf16(smollm2_dir):
    """The bf16 CPU path end to end (oneDNN bf16 products, the C norm, rotary, vdpbf16ps decode attention
    where the CPU has it, the C sampler): two bf16 implementations round differently, so tokens need not be
    transformers' own; instead the log-prob of each sampled token is held against fp32 transformers, and the
    engine must be as close to it as transformers' bf16 forward of the same tokens is."""
    llm = LLM(smollm2_dir, dtype="bfloat16", device="cpu")
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)[:8]
    params = SamplingParams(temperature=1.0, max_tokens=32, logprobs=True, seed=3, ignore_eos=True)
    samples = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    bf16_ref, fp32_ref = hf_model(smollm2_dir, dtype=torch.bfloat16), hf_model(smollm2_dir)
    engine_error, transformers_error = [], []
    for prompt, sample in zip(prompts, samples):
        tokens = torch.tensor(sample.token_ids)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            fp32, bf16 = (torch.log_softmax(m(ids).logits[0].float(), -1)[positions, tokens] for m in (fp32_ref, bf16_ref))
        engine_error.append((torch.tensor(sample.logprobs) - fp32).abs())
        transformers_error.append((bf16 - fp32).abs())
    engine_error, transformers_error = torch.cat(engine_error), torch.cat(transformers_error)
    assert engine_error.numel() == 8 * 32
    # measured: 0.051 against 0.048 nats on average, at most 0.32 (bf16 logits of ~16-32 have an ulp of 0.125);
    # a kernel that put two dimensions of the attention output in each other's place: 2.9 on average
    assert engine_error.mean() <= 1.25 * transformers_error.mean()
    assert engine_error.max() <= 0.6


def test_seeded_sampling_independent_of_batch(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", block_size=8, seed=123)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=20, n=3)
    alone = llm.generate([prompts[4]], seeded, use_tqdm=False)[0]
    crowd_params = [SamplingParams(temperature=1.0, max_tokens=15, n=2) for _ in prompts]
    crowd_params[4] = seeded
    crowded = llm.generate(prompts, crowd_params, use_tqdm=False)[4]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in crowded.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # the n samples are different draws


def test_prefix_cache_reuses_prompt_and_generated_blocks(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", block_size=4)
    prompt = mixed_prompts(llm.engine.model.config.vocab_size)[9]  # 33 tokens
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    continued = prompt + first.outputs[0].token_ids
    bm = llm.engine.block_manager
    hits_before = bm.num_prefix_hit_tokens
    llm.generate([continued], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    # everything but the last (partial) block came from the cache, generated tokens included
    assert bm.num_prefix_hit_tokens - hits_before == (len(continued) - 1) // 4 * 4


def test_n_samples_prefill_the_prompt_once(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False)
    prompt = mixed_prompts(llm.engine.model.config.vocab_size)[10]  # 47 tokens: a partial last block
    out = llm.generate([prompt], SamplingParams(temperature=1.0, n=8, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert llm.engine.stats.prefilled_tokens == len(prompt)
    assert len(out.outputs) == 8 and all(len(o.token_ids) == 6 for o in out.outputs)
    # children continue from the copied partial block: greedy children all equal the greedy continuation
    greedy = llm.generate([prompt], SamplingParams(temperature=0, n=4, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    single = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert all(o.token_ids == single.outputs[0].token_ids for o in greedy.outputs)


def test_stop_conditions(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu")
    prompt = mixed_prompts(llm.engine.model.config.vocab_size)[7]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    # stop token: the first generated token that reappears later
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens suppresses the stop token until enough tokens exist
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, min_tokens=first + 2, stop_token_ids=[stop_id],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    # stop string: text ends before it
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[:text.index(stop)]
    # log-probs of sampled tokens are the model's
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=True, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_model(tiny_llama_dir)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


def test_text_equals_full_decode_with_multibyte_characters(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu")
    prompt = llm.tokenizer.encode("日本語 🙂 and")
    outs = llm.generate([prompt] * 4, SamplingParams(temperature=1.5, max_tokens=40, seed=3, n=2), use_tqdm=False)
    for request in outs:
        for o in request.outputs:
            assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("n", 0),
                                         ("max_tokens", 0), ("top_k", -2), ("min_p", 1.5)])
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_prompt_longer_than_context_names_index(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", max_model_len=64)
    prompts = [[5] * 10, [6] * 70, [7] * 3]
    with pytest.raises(InputError, match="prompt 1 .*context"):
        llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished()  # nothing was queued
    with pytest.raises(InputError, match="prompt 0 .*KV blocks"):
        LLM(tiny_llama_dir, dtype="float32", device="cpu", num_kv_blocks=2, block_size=4).generate(
            [[5] * 10], SamplingParams(max_tokens=4), use_tqdm=False)


def test_stats_count_what_the_steps_did(tiny_model_dir):
    """The counters behind progress bars and the decode roofline: two prompts prefilled in one step, then
    each decode step reads every cached entry of both sequences, the newest token's included."""
    llm = LLM(tiny_model_dir, dtype="float32", device="cpu", block_size=4, seed=0)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)[2:4]  # 5 and 8 tokens
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats
    assert (stats.prefill_steps, stats.prefilled_tokens) == (1, 13)
    assert (stats.decode_steps, stats.generated_tokens) == (3, 8)
    assert stats.decode_context_tokens == sum(len(p) + j for p in prompts for j in (1, 2, 3))


def test_vllm_prompt_dicts_are_their_text_or_ids(tiny_llama_dir):
    """vLLM's TextPrompt and TokensPrompt ({"prompt": ...}, {"prompt_token_ids": ...}) give what the bare text
    or ids give; a dict with neither is an error naming its index."""
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    text, ids = "a prompt", [5, 9, 11, 2]
    plain = llm.generate([text, ids], params, use_tqdm=False)
    wrapped = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in wrapped] == [o.outputs[0].token_ids for o in plain]
    assert [(o.prompt, o.prompt_token_ids) for o in wrapped] == [(text, llm.tokenizer.encode_prompt(text)), (None, ids)]
    assert llm.generate({"prompt": text}, params, use_tqdm=False)[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    with pytest.raises(InputError, match="prompt 1: expected a string or a list of token ids, got dict"):
        llm.generate([text, {"text": text}], params, use_tqdm=False)
