"""The C layer ops for CPU (csrc/cpu/layer_ops.c) against the model's torch code, which is their reference:
bit for bit where the two round the same way (rotary), within an ulp or a few where a sum's order differs; against float64 for the fp32 results; and the module swap keeps the model's
parameters, state dict and outputs."""
import pytest
import torch

from promptcot_engine.kernels.cpu_layer_ops import (
    CPURMSNorm,
    rms_norm_cpu,
    rotary_cpu,
    use_cpu_layer_kernels,
)
from promptcot_engine.kernels.cpu_library import CPU_KERNELS_AVAILABLE
from promptcot_engine.models.decoder import DecoderForCausalLM, RMSNorm
from promptcot_engine.models.model_config import ModelConfig
from promptcot_engine.models.rope import apply_rotary

pytestmark = pytest.mark.skipif(not CPU_KERNELS_AVAILABLE, reason="the CPU kernels are not built (no compiler)")


def randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype tensors (their bit patterns)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return int((a.view(as_int).int() - b.view(as_int).int()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (37, 64), (5, 200), (3, 17)])  # 17, 200: tails past 16 lanes
def test_rms_norm(dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, seed=hidden, scale=3.0)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = randn(hidden, dtype=dtype, seed=hidden + 1)
    with torch.no_grad():
        want = norm(x)
    got = rms_norm_cpu(x, norm.weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # bf16: equal but for an fp32 ulp of the mean that moves a rounding; fp32: rsqrt and the sum's order differ
    assert ulp_distance(got, want) <= (1 if dtype == torch.bfloat16 else 4)
    if dtype == torch.float32:
        x64 = x.double()
        ref = norm.weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(128, 576), (5, 200), (3, 17)])
def test_rms_norm_with_the_residual_add(dtype, rows, hidden):
    """The fused add: the residual becomes x + residual in place, bit for bit torch's add (one rounding), and
    the output is the norm of that sum, as the model's RMSNorm(x, residual) computes them."""
    x = randn(rows, hidden, dtype=dtype, seed=hidden, scale=3.0)
    residual = randn(rows, hidden, dtype=dtype, seed=hidden + 2, scale=5.0)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = randn(hidden, dtype=dtype, seed=hidden + 1)
    with torch.no_grad():
        want, want_sum = norm(x, residual)
    kernel = CPURMSNorm(norm)
    in_place = residual.clone()
    with torch.no_grad():
        got, got_sum = kernel(x, in_place)
    assert got_sum is in_place and torch.equal(got_sum, want_sum) and torch.equal(want_sum, x + residual)
    assert ulp_distance(got, want) <= (1 if dtype == torch.bfloat16 else 4)


def test_rms_norm_on_strided_rows_and_heads():
    """q_norm / k_norm see [T, heads, head_dim] views of a wider projection output."""
    qkv = randn(6, 5, 32, dtype=torch.bfloat16, seed=3)
    x = qkv[:, 1:4]
    weight = randn(32, dtype=torch.bfloat16, seed=4)
    norm = RMSNorm(32, 1e-6).to(torch.bfloat16)
    norm.weight.data = weight
    with torch.no_grad():
        assert ulp_distance(rms_norm_cpu(x, weight, 1e-6), norm(x)) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,head_dim", [(7, 9, 64), (1, 3, 16), (4, 2, 128), (3, 5, 24)])
def test_rotary_equals_torch_bit_for_bit(dtype, tokens, heads, head_dim):
    qkv = randn(tokens, heads + 2, head_dim, dtype=dtype, seed=head_dim)
    x = qkv[:, :heads]  # strided tokens, as the projection's view hands them over
    angles = randn(tokens, head_dim // 2, dtype=torch.float32, seed=head_dim + 1, scale=10.0)
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    got = rotary_cpu(x, cos, sin)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, apply_rotary(x, cos, sin))


def tiny_model(dtype):
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
                         qk_norm=True)
    torch.manual_seed(0)
    model = DecoderForCausalLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_keeps_parameters_and_outputs(dtype):
    from promptcot_engine.attention.varlen import VarlenCausalAttention

    model = tiny_model(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, positions = torch.randint(0, 97, (11,)), torch.arange(11)
    attention = VarlenCausalAttention(torch.tensor([0, 11], dtype=torch.int32))
    with torch.inference_mode():
        want = model(ids, positions, attention)
    weight = model.model.norm.weight
    assert use_cpu_layer_kernels(model) == 2 * 5 + 1  # per layer: 2 norms, q and k norms, rotary; the final norm
    assert isinstance(model.model.norm, CPURMSNorm) and model.model.norm.weight is weight
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        got = model(ids, positions, attention)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # a one-ulp difference in a norm can move later bf16 roundings: a few ulps at the end
        torch.testing.assert_close(got.float(), want.float(), rtol=4 * 2**-8, atol=4 * 2**-8)


def test_gradients_fall_back_to_torch():
    """With a gradient wanted the swapped modules run the torch code, so training through them still works."""
    norm = CPURMSNorm(RMSNorm(32, 1e-5))
    x = torch.randn(4, 32, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    residual = torch.randn(4, 32)
    before = residual.clone()
    out, total = norm(x, residual)
    (out.sum() + total.sum()).backward()
    assert torch.equal(residual, before)  # the torch path adds out of place, as autograd needs
