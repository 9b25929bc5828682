"""LLM.score: per-token log-probs equal transformers' log_softmax-gather (fp32, <= 1e-4)."""
import pytest
import torch

from promptcot_engine import LLM
from promptcot_engine.errors import InputError
from tests.reference import hf_model, hf_token_logprobs

TOL = 1e-4


def random_pairs(vocab: int, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, vocab, (c,), generator=g).tolist(), torch.randint(3, vocab, (x,), generator=g).tolist())
            for c, x in shapes]


def test_score_matches_transformers(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", device="cpu", block_size=8)
    ref = hf_model(tiny_model_dir)
    shared = random_pairs(llm.engine.model.config.vocab_size, [(37, 1)])[0][0]
    pairs = random_pairs(llm.engine.model.config.vocab_size, [(1, 5), (9, 40), (16, 16), (50, 3), (23, 77)])
    pairs += [(shared, x) for _, x in random_pairs(llm.engine.model.config.vocab_size, [(1, 12), (1, 30), (1, 1)], seed=1)]
    results = llm.score([c for c, _ in pairs], [x for _, x in pairs], use_tqdm=False)
    for (context, continuation), result in zip(pairs, results):
        expected, greedy = hf_token_logprobs(ref, context, continuation)
        assert result.token_ids == continuation
        assert torch.allclose(torch.tensor(result.token_logprobs), expected, atol=TOL, rtol=0)
        assert abs(result.logprob_sum - expected.sum().item()) <= TOL * len(continuation)
        assert result.is_greedy == greedy


def test_segments_give_one_sum_each_and_greedy_flag(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu")
    ref = hf_model(tiny_llama_dir)
    tok = llm.tokenizer
    context = "Foundational Concepts:\n1. Modular arithmetic\nDifficulty Level: AIME"
    segments = ["<!-- BEGIN RATIONALE -->\n", "think about it", "\n<!-- END RATIONALE -->\n", "a problem", "\n"]
    result = llm.score([context], [segments], use_tqdm=False)[0]
    ids = [tok.encode(s, add_special_tokens=False) for s in segments]
    expected, _ = hf_token_logprobs(ref, tok.encode(context), [t for s in ids for t in s])
    assert result.segment_lengths == [len(s) for s in ids]
    offset = 0
    for n, got in zip(result.segment_lengths, result.segment_logprob_sums):
        assert abs(got - expected[offset:offset + n].sum().item()) <= TOL * max(n, 1)
        offset += n
    # the greedy continuation is flagged greedy
    greedy = llm.generate([tok.encode(context)], __import__("promptcot_engine").SamplingParams(temperature=0, max_tokens=6,
                                                                                              ignore_eos=True), use_tqdm=False)
    out = llm.score([context], [greedy[0].outputs[0].token_ids], use_tqdm=False)[0]
    assert out.is_greedy


def test_shared_context_is_computed_once(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", block_size=4)
    vocab = llm.engine.model.config.vocab_size
    context = random_pairs(vocab, [(64, 1)])[0][0]
    continuations = [x for _, x in random_pairs(vocab, [(1, 10)] * 8, seed=2)]
    llm.score([context] * 8, continuations, use_tqdm=False)
    # the first pair computes the context, the other seven reuse all its full blocks but the last
    # (which holds the token whose hidden state predicts the first continuation token)
    computed = llm.engine.stats.prefilled_tokens
    assert computed == (64 + 10) + 7 * (64 - 60 + 10)


def test_score_after_generate_reuses_generated_blocks(tiny_llama_dir):
    from promptcot_engine import SamplingParams

    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", block_size=4)
    prompt = random_pairs(llm.engine.model.config.vocab_size, [(20, 1)])[0][0]
    out = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=1), use_tqdm=False)
    before = llm.engine.block_manager.num_prefix_hit_tokens
    llm.score([prompt], [out[0].outputs[0].token_ids], use_tqdm=False)
    assert llm.engine.block_manager.num_prefix_hit_tokens - before == 16  # the prompt's full blocks (20 - 1 -> 16)


@pytest.mark.slow
def test_smollm2_score_matches_transformers(smollm2_dir):
    llm = LLM(smollm2_dir, dtype="float32", device="cpu")
    ref = hf_model(smollm2_dir)
    contexts = ["Question: What is 2 + 3?\nAnswer:", "def fib(n):", "The capital of France is"]
    continuations = [" 5", "\n    return n if n < 2 else fib(n - 1) + fib(n - 2)", " Paris, a city on the Seine."]
    results = llm.score(contexts, continuations, use_tqdm=False)
    for c, x, r in zip(contexts, continuations, results):
        expected, greedy = hf_token_logprobs(ref, llm.tokenizer.encode(c), llm.tokenizer.encode(x, add_special_tokens=False))
        assert torch.allclose(torch.tensor(r.token_logprobs), expected, atol=TOL, rtol=0)
        assert r.is_greedy == greedy


def test_bad_pairs_name_their_index(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", max_model_len=32)
    with pytest.raises(InputError, match="pair 1: empty continuation"):
        llm.score(["a b c", "d e f"], ["x", ""], use_tqdm=False)
    with pytest.raises(InputError, match="pair 2 .*context"):
        llm.score(["a", "b", "c " * 20], ["x", "y", "z " * 20], use_tqdm=False)
    with pytest.raises(InputError, match="2 contexts but 1 continuations"):
        llm.score(["a", "b"], ["x"], use_tqdm=False)
    with pytest.raises(InputError, match="pair 0 has 33 tokens: longer than the model's context \\(32 tokens\\)"):
        llm.score([[5] * 20], [[6] * 13], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_a_pair_may_fill_the_whole_context(tiny_llama_dir):
    """Scoring generates nothing, so context + continuation may be exactly the model's context (generation
    needs room for one more token)."""
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", max_model_len=32)
    g = torch.Generator().manual_seed(5)
    context = torch.randint(3, 300, (20,), generator=g).tolist()
    continuation = torch.randint(3, 300, (12,), generator=g).tolist()
    (result,) = llm.score([context], [continuation], use_tqdm=False)
    expected, _ = hf_token_logprobs(hf_model(tiny_llama_dir), context, continuation)
    assert torch.allclose(torch.tensor(result.token_logprobs), expected, atol=TOL, rtol=0)
    with pytest.raises(InputError, match="prompt 0 has 32 tokens: .*with room for one new token"):
        llm.generate([context + continuation], use_tqdm=False)
