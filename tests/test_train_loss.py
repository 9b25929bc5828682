"""The training loss: packed equals unpacked, one step equals transformers' loss and AdamW update on the
same batch, activation checkpointing changes nothing but memory."""
import pytest
import torch

from promptcot_engine.models.loader import load_model
from promptcot_engine.train import TrainConfig, Trainer
from promptcot_engine.train.activation_checkpointing import activation_checkpointing
from promptcot_engine.train.data import read_records, tokenize_sft
from promptcot_engine.train.loss_head import CausalLMLoss
from promptcot_engine.train.packing import pack
from tests.reference import hf_model
from tests.tiny_checkpoints import tiny_checkpoint

RECORDS = [
    {"prompt": "Find the number of positive integers", "completion": " n less than 1000"},
    {"prompt": "def solve(n):", "completion": ["\n    return ", "sum(i * i for i in range(n))"]},
    {"prompt": "In triangle ABC,", "completion": " AB = 13, BC = 14 and CA = 15. Compute the area."},
]


def examples_for(tokenizer):
    return tokenize_sft(read_records(RECORDS), tokenizer, 512, "truncate")[0]


def loss_and_grads(loss_module, sequences):
    loss_module.zero_grad(set_to_none=True)
    loss = loss_module(pack(sequences))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in loss_module.named_parameters()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_packed_and_unpacked_batches_give_equal_loss_and_gradients(name):
    model, checkpoint = load_model(tiny_checkpoint(name), dtype="float32", device="cpu")
    loss_module = CausalLMLoss(model)
    sequences = [s for e in examples_for(checkpoint.tokenizer) for s in e.sequences()]
    packed_loss, packed_grads = loss_and_grads(loss_module, sequences)
    separate = [loss_and_grads(loss_module, [s]) for s in sequences]
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in separate), rtol=1e-5, atol=1e-5)
    for name_ in packed_grads:
        torch.testing.assert_close(packed_grads[name_], sum(g[name_] for _, g in separate), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_one_step_equals_transformers_loss_and_adamw_update(name):
    """The trainer's first step (two micro-batches) against transformers on the padded batch: its loss
    with labels, then clip_grad_norm_ and torch's AdamW. Adam's first update is lr * g / (|g| + eps): with
    the default eps a gradient entry of 1e-8, float noise in either, would move by up to lr; eps 1e-4 keeps
    the comparison about the gradients."""
    path = tiny_checkpoint(name)
    config = TrainConfig(lr=1e-3, batch_size=3, grad_accum=2, max_grad_norm=0.5, weight_decay=0.0, adam_eps=1e-4)
    trainer = Trainer.from_pretrained(path, config, device="cpu")
    examples = examples_for(trainer.tokenizer)
    result = trainer.train(RECORDS, use_tqdm=False)

    reference = hf_model(path).train()
    width = max(len(e.input_ids) for e in examples)
    pad = lambda values, fill: values + [fill] * (width - len(values))
    input_ids = torch.tensor([pad(e.input_ids, 0) for e in examples])
    attention_mask = torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples])
    labels = torch.tensor([pad(e.labels, -100) for e in examples])
    loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert result["history"][0]["loss"] == pytest.approx(loss.item(), rel=1e-5)

    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert grad_norm.item() > 0.5  # clipping did something to compare
    assert result["history"][0]["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    initial = hf_model(path).state_dict()
    torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0, eps=1e-4).step()
    ours = trainer.model.state_dict()
    for param_name, param in reference.state_dict().items():
        assert not torch.equal(param, initial[param_name]) or param_name == "lm_head.weight"
        torch.testing.assert_close(ours[param_name], param, rtol=1e-5, atol=1e-6, msg=param_name)


def retained_bytes(loss_module, batch) -> int:
    """CPU memory the forward leaves allocated while its graph is alive (the profiler's allocation
    accounting: allocations minus frees)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_module(batch)
    retained = sum(event.self_cpu_memory_usage for event in prof.events())
    del loss
    return retained


def test_activation_checkpointing_gives_equal_gradients_and_keeps_less():
    model, checkpoint = load_model(tiny_checkpoint("qwen2"), dtype="float32", device="cpu")
    loss_module = CausalLMLoss(model)
    sequences = [s for e in examples_for(checkpoint.tokenizer) for s in e.sequences()]
    plain = loss_and_grads(loss_module, sequences)
    retained = {"none": retained_bytes(loss_module, pack(sequences))}
    for mode in ("selective", "full"):
        with activation_checkpointing(model.model.layers, mode):
            loss, grads = loss_and_grads(loss_module, sequences)
            retained[mode] = retained_bytes(loss_module, pack(sequences))
        assert all("forward" not in vars(layer) for layer in model.model.layers)  # the patch is undone
        torch.testing.assert_close(loss, plain[0], rtol=0, atol=0)
        for name in plain[1]:
            torch.testing.assert_close(grads[name], plain[1][name], rtol=1e-6, atol=1e-7)
    assert retained["full"] < 0.5 * retained["selective"] and retained["selective"] < 0.75 * retained["none"]


def test_bf16_autocast_step_close_to_fp32():
    """The GPU's mixed precision path (bf16 autocast over fp32 master weights), run on the CPU: losses
    within bf16 rounding of the fp32 run's, weights still fp32."""
    path = tiny_checkpoint("llama")
    runs = {}
    for bf16 in (False, True):
        trainer = Trainer.from_pretrained(path, TrainConfig(lr=1e-2, epochs=3, batch_size=3, bf16=bf16), device="cpu")
        runs[bf16] = [m["loss"] for m in trainer.train(RECORDS, use_tqdm=False)["history"]]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert runs[True] == pytest.approx(runs[False], rel=1e-2)
    assert runs[True] != runs[False]  # autocast was on
