"""Sampling frequencies match the exact renormalized distribution (chi-square), per truncation rule."""
import numpy as np
import pytest
import torch

from promptcot_engine.engine.random_streams import stream_key, uniform_draws
from promptcot_engine.engine.sampler import inverse_cdf, sample
from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.kernels.cpu_sampler import sample_rows_cpu
from promptcot_engine.sampling_params import SamplingParams

# every draw both ways: the C sampler (where built) and torch's softmax with inverse_cdf, its reference
DRAWS = [pytest.param(True, id="cpu-kernel", marks=pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="not built")),
         pytest.param(False, id="torch")]

LOGITS = np.array([2.0, 1.5, 1.2, 0.3, -0.5, -1.0, 0.9])


def exact_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Straight from the definitions, in float64: temperature, keep the k best, then the smallest set of best
    tokens whose mass reaches top_p, then drop tokens below min_p times the best probability; renormalize."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= top_p:
            continue
        nucleus[i] = True
        mass += q[i]
    q = np.where(nucleus, q, 0)
    q = np.where(q >= min_p * q.max(), q, 0)
    return q / q.sum()


def chi_square_p_value(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    n = counts.sum()
    support = expected_probs > 0
    expected = expected_probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return float(1 - torch.special.gammainc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("cpu_kernel", DRAWS)
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, -1, 1.0, 0.0), (0.5, -1, 1.0, 0.0), (2.0, -1, 1.0, 0.0), (1.0, 3, 1.0, 0.0),
    (1.0, -1, 0.7, 0.0), (1.0, -1, 1.0, 0.3), (0.8, 4, 0.9, 0.1), (1.3, 2, 0.5, 0.0),
])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p, min_p, cpu_kernel):
    n = 40_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(n, -1).clone()
    uniform = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    tokens, _ = sample(logits, [params] * n, uniform, cpu_kernel=cpu_kernel)
    counts = np.bincount(tokens.numpy(), minlength=len(LOGITS))
    expected = exact_distribution(LOGITS, temperature, top_k, top_p, min_p)
    assert counts[expected == 0].sum() == 0  # truncated tokens are never drawn
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("cpu_kernel", DRAWS)
def test_a_rows_token_depends_only_on_its_logits_and_number(cpu_kernel):
    """What makes a seeded sample's tokens independent of its batch: other rows, greedy or sampled, change
    nothing about a row's draw."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    logits = torch.tensor(LOGITS, dtype=torch.float32)[None]
    numbers = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def draw(others: list[SamplingParams]):
        g = torch.Generator().manual_seed(len(others))
        tokens = []
        for u in numbers:
            rows = torch.cat([logits, torch.randn(len(others), len(LOGITS), generator=g)])
            uniform = torch.cat([u[None], torch.rand(len(others), dtype=torch.float64, generator=g)])
            tokens.append(int(sample(rows, [params] + others, uniform, cpu_kernel=cpu_kernel)[0][0]))
        return tokens

    alone = draw([])
    assert alone == draw([SamplingParams()] * 7) == draw([SamplingParams(temperature=0), SamplingParams(top_k=2)])
    assert len(set(alone)) > 1


def test_random_streams_are_splitmix64():
    """A stream's numbers are SplitMix64's outputs from its key (the published sequence for seed 1234567),
    as 53-bit fractions."""
    published = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                 16408922859458223821]
    assert uniform_draws([1234567] * 5, list(range(5))).tolist() == [(v >> 11) * 2.0 ** -53 for v in published]
    assert uniform_draws([1234567, 99], [3, 0])[0] == (published[3] >> 11) * 2.0 ** -53  # rows are independent


def test_random_streams_are_uniform_and_distinct():
    """Along one stream, and across the streams of many (seed, index) pairs at one counter: uniform
    (chi-square over 64 bins), and no two samples of a request share a stream."""
    keys = [stream_key(seed, index) for seed in range(200) for index in range(50)]
    assert len(set(keys)) == len(keys)
    assert stream_key(7, 0) == stream_key(7, 0) != stream_key(7 + 2 ** 64, 1)
    for numbers in (uniform_draws([keys[0]] * 10_000, list(range(10_000))), uniform_draws(keys, [0] * len(keys))):
        assert 0 <= numbers.min() and numbers.max() < 1
        counts = np.bincount((numbers * 64).astype(int), minlength=64)
        assert chi_square_p_value(counts, np.full(64, 1 / 64)) > 1e-3


def test_greedy_and_logprobs():
    logits = torch.randn(5, 11)
    params = [SamplingParams(temperature=0)] * 5
    tokens, logprobs = sample(logits, params, None, want_logprobs=True)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))


@pytest.mark.parametrize("cpu_kernel", DRAWS)
def test_frequencies_across_cdf_chunks(cpu_kernel):
    """Tokens on both sides of the sampler's CDF chunk boundaries (1024), in a vocabulary of several chunks."""
    vocab, hot = 2500, [0, 5, 1023, 1024, 2047, 2048, 2499]
    logits = torch.full((vocab,), -30.0, dtype=torch.float64)
    logits[hot] = torch.tensor([1.0, 0.2, 1.5, -0.3, 0.8, 0.0, 1.1], dtype=torch.float64)
    n = 30_000
    tokens, _ = sample(logits.float().expand(n, -1).clone(), [SamplingParams()] * n,
                       torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(99)), cpu_kernel=cpu_kernel)
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    expected = logits.softmax(-1).numpy()
    assert counts[np.setdiff1d(np.arange(vocab), hot)].sum() <= 3  # the cold tokens hold ~1e-9 of the mass each
    assert chi_square_p_value(counts[hot], expected[hot] / expected[hot].sum()) > 1e-3


@pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")
def test_cpu_draw_inverts_the_same_cdf_as_torch():
    """Given the same uniform numbers, the C draw picks torch's token but where u falls within rounding of a
    boundary (their chunk masses are summed in another order): on 49,152 tokens, a few rows in a thousand at
    most. bf16 logits widen exactly, so they draw what their fp32 copy draws; -inf tokens are never drawn."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 49152, generator=g) * 3
    logits[:, 1000:1100] = float("-inf")
    logits[7, :] = float("-inf")
    logits[7, 40000] = 0.0  # one live token, in the last chunk
    uniform = torch.rand(512, 1, dtype=torch.float64, generator=g)
    uniform[:2] = torch.tensor([[0.0], [1 - 2**-53]], dtype=torch.float64)  # the ends of [0, 1)
    want = inverse_cdf(logits.softmax(-1), uniform)
    got = sample_rows_cpu(logits, uniform)
    assert (got == want).sum() >= 508 and int(got[7]) == 40000
    assert not ((got >= 1000) & (got < 1100)).any()
    assert torch.equal(sample_rows_cpu(logits.bfloat16(), uniform), sample_rows_cpu(logits.bfloat16().float(), uniform))
    # a vocabulary that is not a multiple of the 16 lanes or the 1024-token chunks, strided rows
    odd = torch.randn(64, 3000, generator=g)[:, :2999]
    u = torch.rand(64, dtype=torch.float64, generator=g)
    assert (sample_rows_cpu(odd, u) == inverse_cdf(odd.softmax(-1), u[:, None])).sum() >= 63
