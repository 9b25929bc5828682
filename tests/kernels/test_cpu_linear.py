"""oneDNN products against float64 F.linear: plain and prepacked weights, staleness after an in-place
write, merged products, the module swap keeping the model's parameters and results."""
import pytest
import torch
from torch import nn

from promptcot_engine.kernels.cpu_linear import (MergedProducts, OneDNNLinear, cpu_linear, onednn_applies, prepack_weight,
                                                 use_onednn_linear)
from promptcot_engine.models.decoder import MLP, DecoderForCausalLM, SelfAttention
from promptcot_engine.models.model_config import ModelConfig

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def inputs(shape_x, out_features, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, generator=g).to(dtype)
    w = (torch.randn(out_features, shape_x[-1], generator=g) / shape_x[-1] ** 0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return x, w, b


def reference(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape_x,out_features,bias", [((128, 96), 200, True), ((1, 64), 49, False),
                                                       ((2, 7, 33), 130, True)])
def test_matches_float64(dtype, packed, shape_x, out_features, bias):
    x, w, b = inputs(shape_x, out_features, dtype, seed=1, bias=bias)
    assert onednn_applies(x, w)
    if packed:
        prepack_weight(w)
    got = cpu_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (*shape_x[:-1], out_features)
    torch.testing.assert_close(got.double(), reference(x, w, b), **TOL[dtype])


def test_non_contiguous_input():
    x, w, b = inputs((96, 40), 64, torch.float32, seed=2)
    x = x.T.contiguous().T  # same values, column-major
    prepack_weight(w)
    torch.testing.assert_close(cpu_linear(x, w, b).double(), reference(x, w, b), **TOL[torch.float32])


def test_in_place_write_repacks():
    x, w, _ = inputs((16, 32), 24, torch.float32, seed=3)
    prepack_weight(w)
    cpu_linear(x, w)
    with torch.no_grad():
        w.mul_(-2.0)  # what load_weights does: copy_ into the parameter
    torch.testing.assert_close(cpu_linear(x, w).double(), reference(x, w, None), **TOL[torch.float32])


def test_module_in_inference_sees_an_in_place_write():
    """OneDNNLinear's own fast path (inference, packed copy) checks the copy's version too."""
    x, w, _ = inputs((16, 32), 24, torch.float32, seed=6)
    layer = nn.Linear(32, 24, bias=False)
    layer.weight = nn.Parameter(w, requires_grad=False)
    holder = nn.Sequential(layer)
    use_onednn_linear(holder)
    with torch.inference_mode():
        holder(x)
        with torch.no_grad():
            layer.weight.mul_(-2.0)
        torch.testing.assert_close(holder(x).double(), reference(x, layer.weight, None), **TOL[torch.float32])


def linear_layers(dtype, bias, widths=(48, 16, 16), features=40, seed=7):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for width in widths:
        layer = nn.Linear(features, width, bias=bias).to(dtype).requires_grad_(False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(width, features, generator=g) / features ** 0.5)
            if bias:
                layer.bias.copy_(torch.randn(width, generator=g))
        layers.append(layer)
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_merged_products_equal_each_layers_own(dtype, bias):
    layers = linear_layers(dtype, bias)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    with torch.inference_mode():
        outputs = MergedProducts(*layers)(x)
    assert [o.shape for o in outputs] == [(9, 48), (9, 16), (9, 16)]
    for out, layer in zip(outputs, layers):
        torch.testing.assert_close(out.double(), reference(x, layer.weight, layer.bias), **TOL[dtype])


def test_merged_products_repack_after_one_layer_is_written():
    layers = linear_layers(torch.float32, bias=True)
    merged = MergedProducts(*layers)
    x = torch.randn(5, 40)
    with torch.inference_mode():
        merged(x)
        with torch.no_grad():
            layers[1].weight.mul_(3.0)  # what load_weights does to one of them
            layers[2].bias.add_(1.0)
        outputs = merged(x)
    for out, layer in zip(outputs, layers):
        torch.testing.assert_close(out.double(), reference(x, layer.weight, layer.bias), **TOL[torch.float32])
    layers[0].weight = nn.Parameter(layers[0].weight.detach() * -1.0, requires_grad=False)  # replaced, not written
    with torch.inference_mode():
        outputs = merged(x)
    for out, layer in zip(outputs, layers):
        torch.testing.assert_close(out.double(), reference(x, layer.weight, layer.bias), **TOL[torch.float32])


def test_merged_products_leave_gradients_to_each_layer():
    layers = linear_layers(torch.float32, bias=False, widths=(8, 8), features=12)
    layers[0].weight.requires_grad_(True)
    x = torch.randn(3, 12)
    first, _ = MergedProducts(*layers)(x)
    first.sum().backward()
    torch.testing.assert_close(layers[0].weight.grad, x.sum(0)[None, :].expand(8, 12))


def test_gradients_stay_on_f_linear():
    x, w, b = inputs((8, 16), 12, torch.float32, seed=4)
    w.requires_grad_(True)
    assert not onednn_applies(x, w)
    cpu_linear(x, w, b).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0)[None, :].expand(12, 16))


def test_swap_keeps_parameters_state_dict_and_outputs():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = DecoderForCausalLM(config).eval()
    params_before = dict(model.named_parameters())
    hidden = torch.randn(5, 32)
    want = model.compute_logits(hidden)
    x = torch.randn(5, 32)
    want_attention = [layer.self_attn.qkv(x) for layer in model.model.layers]
    want_mlp = [layer.mlp.gate_up(x) for layer in model.model.layers]
    assert use_onednn_linear(model) == 2 * 7 + 1
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, OneDNNLinear)
    # q/k/v and gate/up became one product each; their weights keep no packed copy of their own
    for module in model.modules():
        if isinstance(module, (SelfAttention, MLP)):
            hook = module.qkv if isinstance(module, SelfAttention) else module.gate_up
            assert isinstance(hook, MergedProducts)
            assert not any(hasattr(layer.weight, "onednn_packed") for layer in hook.layers)
    with torch.inference_mode():
        for layer, attention, mlp in zip(model.model.layers, want_attention, want_mlp):
            for got, expected in zip(layer.self_attn.qkv(x) + layer.mlp.gate_up(x), attention + mlp):
                torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys() and all(after[k] is params_before[k] for k in after)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(hidden), want.detach(), rtol=1e-5, atol=1e-5)


def test_without_onednn_everything_stays_on_f_linear(monkeypatch):
    from promptcot_engine.kernels import cpu_linear as module

    monkeypatch.setattr(module, "ONEDNN_AVAILABLE", False)
    x, w, b = inputs((4, 16), 8, torch.float32, seed=5)
    assert not onednn_applies(x, w)
    layer = nn.Linear(16, 8)
    holder = nn.Sequential(layer)
    use_onednn_linear(holder)
    assert not hasattr(layer.weight, "onednn_packed")
    torch.testing.assert_close(cpu_linear(x, w, b).double(), reference(x, w, b), **TOL[torch.float32])
