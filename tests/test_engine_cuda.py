"""The engine on CUDA (Triton decode kernel in the model, CUDA graphs, KV cache sized by profiling) against
transformers on the same GPU; and, on any machine, which attention backend a configuration resolves to."""
import pytest
import torch

import promptcot_engine.engine.model_runner as model_runner
from promptcot_engine import LLM, SamplingParams
from promptcot_engine.errors import InputError
from tests.reference import hf_model
from tests.test_engine_generate import engine_greedy, hf_greedy, mixed_prompts
from tests.reference import hf_token_logprobs
from tests.test_engine_score import TOL, random_pairs
from tests.tiny_checkpoints import VOCAB_SIZE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("backend,enforce_eager", [("triton", False), ("triton", True), ("torch", True)])
def test_greedy_matches_transformers_on_cuda(tiny_model_dir, backend, enforce_eager):
    # 16 sequences at most: the prompts fit, and only graphs of up to 16 rows are captured
    llm = LLM(tiny_model_dir, dtype="float32", device="cuda", attention_backend=backend, enforce_eager=enforce_eager,
              seed=0, max_num_seqs=16)
    assert llm.engine.runner.backend == backend
    assert (llm.engine.runner.cuda_graphs is not None) == (not enforce_eager)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    expected = hf_greedy(hf_model(tiny_model_dir).cuda(), prompts, sorted(llm.engine.eos_token_ids))
    for _ in range(2):  # the second pass runs through the prefix cache the first filled
        assert engine_greedy(llm, prompts) == expected


@cuda
def test_preemption_and_chunked_prefill_on_cuda(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cuda", num_kv_blocks=24, block_size=8, max_num_seqs=16,
              max_num_batched_tokens=40)
    prompts = mixed_prompts(llm.engine.model.config.vocab_size)
    expected = hf_greedy(hf_model(tiny_llama_dir).cuda(), prompts, sorted(llm.engine.eos_token_ids))
    assert engine_greedy(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0


@cuda
def test_seeded_samples_are_the_same_on_cuda_as_on_cpu(tiny_llama_dir):
    """A sample's random numbers depend only on its seed, index and position (engine/random_streams.py), so
    on two devices whose fp32 logits agree it draws the same tokens. A draw can still differ where a number
    falls within rounding of a CDF boundary, after which that sample goes its own way: nearly all must agree."""
    prompts = mixed_prompts(VOCAB_SIZE)[:8]
    params = [SamplingParams(n=4, temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    samples = {}
    for device in ("cpu", "cuda"):
        llm = LLM(tiny_llama_dir, dtype="float32", device=device, max_num_seqs=16, seed=0)
        samples[device] = [c.token_ids for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
    same = sum(a == b for a, b in zip(samples["cpu"], samples["cuda"]))
    assert same >= 0.9 * len(samples["cpu"]) and len({tuple(s) for s in samples["cuda"]}) > 1


@cuda
def test_score_matches_transformers_on_cuda(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", device="cuda", max_num_seqs=16)
    ref = hf_model(tiny_model_dir).cuda()
    vocab = llm.engine.model.config.vocab_size
    shared = random_pairs(vocab, [(37, 1)])[0][0]
    pairs = random_pairs(vocab, [(1, 5), (9, 40), (16, 16), (50, 3)])
    pairs += [(shared, x) for _, x in random_pairs(vocab, [(1, 12), (1, 30), (1, 1)], seed=1)]  # a prefix-cache hit
    results = llm.score([c for c, _ in pairs], [x for _, x in pairs], use_tqdm=False)
    for (context, continuation), result in zip(pairs, results):
        expected, greedy = hf_token_logprobs(ref, context, continuation)
        assert torch.allclose(torch.tensor(result.token_logprobs), expected, atol=TOL, rtol=0)
        assert result.is_greedy == greedy


@cuda
def test_two_engines_in_one_process_each_get_their_share(tiny_llama_dir):
    """The EM loop's q and p: the second engine's KV cache is its own share, not what the first one left."""
    total = torch.cuda.mem_get_info()[1]
    # a small share (each block is a Python object in the block manager), and room for all of it to be useful
    first, second = (LLM(tiny_llama_dir, dtype="float32", device="cuda", gpu_memory_utilization=0.02,
                         max_num_seqs=1 << 20, enforce_eager=True) for _ in range(2))
    for llm in (first, second):
        cache_bytes = llm.engine.runner.kv_cache.numel() * llm.engine.runner.kv_cache.element_size()
        assert 0.015 * total < cache_bytes <= 0.02 * total
    assert abs(first.engine.runner.num_blocks - second.engine.runner.num_blocks) <= 0.01 * first.engine.runner.num_blocks


def test_cuda_kv_cache_budget_is_each_engines_share():
    GB = 1 << 30
    # a lone engine: its share less its weights and activations
    assert model_runner.cuda_kv_cache_budget(100 * GB, 95 * GB, 0.9, 2 * GB, 3 * GB) == 85 * GB
    # a second engine of the same size after the first took 30 GB: the same share, from what is free
    assert model_runner.cuda_kv_cache_budget(100 * GB, 65 * GB, 0.3, 2 * GB, 3 * GB) == 25 * GB
    # never more than is free beside the activations, whatever the share says
    assert model_runner.cuda_kv_cache_budget(100 * GB, 20 * GB, 0.9, 2 * GB, 3 * GB) == 17 * GB
    assert model_runner.cuda_kv_cache_budget(100 * GB, 2 * GB, 0.9, 2 * GB, 3 * GB) < 0


@pytest.mark.parametrize("requested,dtype,block_size,installed,expected", [
    ("auto", torch.bfloat16, None, True, "flash"),
    ("auto", torch.float32, None, True, "triton"),  # flash-attn takes fp16/bf16 only
    ("auto", torch.bfloat16, 16, True, "triton"),  # its paged layout needs blocks of a multiple of 256
    ("auto", torch.bfloat16, None, False, "triton"),
    ("triton", torch.float32, 16, True, "triton"),
    ("flash", torch.float32, None, True, InputError),
    ("flash", torch.bfloat16, 128, True, InputError),
    ("flash", torch.bfloat16, None, False, InputError),
])
def test_attention_backend_resolution(monkeypatch, requested, dtype, block_size, installed, expected):
    monkeypatch.setattr(model_runner, "flash_attn_available", lambda device: installed)
    resolve = model_runner.resolve_attention_backend
    if expected is InputError:
        with pytest.raises(InputError, match="flash"):
            resolve(requested, torch.device("cuda"), dtype, block_size)
    else:
        assert resolve(requested, torch.device("cuda"), dtype, block_size) == expected
    assert resolve("auto", torch.device("cpu"), dtype, block_size) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="CUDA"):
        resolve("triton", torch.device("cpu"), dtype, block_size)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter runs the kernels on CPU tensors
    assert resolve("triton", torch.device("cpu"), dtype, block_size) == "triton"
    with pytest.raises(InputError, match="CUDA"):
        resolve("flash", torch.device("cpu"), dtype, block_size)
