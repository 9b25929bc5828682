"""The engine on CUDA (Triton decode kernel in the model, CUDA graphs, KV cache sized by profiling) against
transformers on the same GPU; and, on any machine, which attention backend a configuration resolves to."""
import pytest
import torch

import promptcot_engine.engine.model_runner as model_runner
from promptcot_engine import LLM
from promptcot_engine.errors import InputError
from tests.reference import hf_model
from tests.test_engine_generate import engine_greedy, hf_greedy, mixed_prompts
from tests.test_engine_score import TOL, hf_token_logprobs, random_pairs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("backend,enforce_eager", [("triton", False), ("triton", True), ("torch", True)])
def test_greedy_matches_transformers_on_cuda(tiny_model_dir, backend, enforce_eager):
    llm = LLM(tiny_model_dir, dtype="float32", device="cuda", attention_backend=backend, enforce_eager=enforce_eager,
              seed=0)
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
def test_score_matches_transformers_on_cuda(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", device="cuda")
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
