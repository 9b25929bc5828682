"""The Trainer end to end: memorization, the in-process handoff, checkpoints transformers loads, and a
resumed run that continues the interrupted run's loss curve step for step."""
import json

import pytest
import torch

from promptcot_engine.errors import InputError
from promptcot_engine.models.loader import load_model
from promptcot_engine.train import TrainConfig, Trainer
from promptcot_engine.train.checkpoint import TRAINING_STATE, latest_checkpoint
from tests.reference import engine_logits, hf_logits, hf_model
from tests.tiny_checkpoints import tiny_checkpoint

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Find the number of positive integers n.",
    "def solve(n): return sum(range(n))", "Foundational Concepts: Modular arithmetic",
    "In triangle ABC, AB = 13 and BC = 14.", "Compute the area, then the inradius r.",
    "Let x be a real number such that x^2 = 4.", "Difficulty Level: AIME",
]
SFT_RECORDS = [{"prompt": s[:10], "completion": s[10:]} for s in SENTENCES]
DPO_RECORDS = [{"prompt": s[:10], "chosen": s[10:], "rejected": s[10:][::-1]} for s in SENTENCES]


def test_tiny_model_memorizes_eight_sequences():
    model, checkpoint = load_model(tiny_checkpoint("llama"), dtype="float32", device="cpu")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    config = TrainConfig(lr=1e-2, epochs=80, batch_size=8, lr_schedule="constant", seed=1)
    trainer = Trainer(model, checkpoint.tokenizer, config)
    result = trainer.train(SFT_RECORDS, use_tqdm=False)
    losses = [m["loss"] for m in result["history"]]
    assert losses[0] > 4.0 and result["loss"] < 0.02
    # the caller's model object was trained in place, under the names the inference engine loads
    assert trainer.model is model and set(model.state_dict()) == set(before)
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert result["steps"] == 80 and result["examples"] == 8 and result["tokens"] > 0


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # tied and untied LM head
def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, name):
    config = TrainConfig(lr=1e-2, epochs=2, batch_size=4, output_dir=str(tmp_path))
    trainer = Trainer.from_pretrained(tiny_checkpoint(name), config, device="cpu")
    trainer.train(SFT_RECORDS, use_tqdm=False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    sequences = [trainer.tokenizer.encode(s) for s in SENTENCES[:3]]
    ours = engine_logits(trainer.model, sequences)
    for a, b in zip(ours, hf_logits(hf_model(tmp_path), sequences)):
        assert (a - b).abs().max().item() <= 1e-4
    reloaded, _ = load_model(tmp_path, dtype="float32", device="cpu")
    for a, b in zip(ours, engine_logits(reloaded, sequences)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_resumed_run_continues_the_same_loss_curve(tmp_path, objective):
    records = SFT_RECORDS + SFT_RECORDS[:2] if objective == "sft" else DPO_RECORDS + DPO_RECORDS[:2]
    def config(output_dir):
        # 10 examples in batches of 4: 3 steps an epoch, the last one short; warmup, decay, clipping, decay
        return TrainConfig(objective=objective, lr=3e-3, epochs=3, batch_size=4, grad_accum=2, warmup=2,
                           weight_decay=0.1, max_grad_norm=1.0, save_steps=4, output_dir=str(output_dir))

    whole = Trainer.from_pretrained(tiny_checkpoint("llama"), config(tmp_path / "whole"), device="cpu")
    uninterrupted = whole.train(records, use_tqdm=False)["history"]
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert latest_checkpoint(tmp_path / "whole").name == "checkpoint-8" and (checkpoint / TRAINING_STATE).is_file()

    # a fresh process's view: the model, tokenizer and optimizer state all come from the checkpoint
    resumed_trainer = Trainer.from_pretrained(checkpoint, config(tmp_path / "resumed"), device="cpu")
    resumed = resumed_trainer.train(records, resume_from=checkpoint, use_tqdm=False)["history"]
    assert [m["step"] for m in resumed] == list(range(5, 10))
    for a, b in zip(resumed, uninterrupted[4:]):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] and a["grad_norm"] == b["grad_norm"]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(resumed_trainer.model.state_dict()[name], tensor), name


def test_resume_into_the_same_output_rewrites_metrics_as_one_run(tmp_path):
    config = TrainConfig(lr=1e-3, epochs=2, batch_size=4, save_steps=2, output_dir=str(tmp_path))
    Trainer.from_pretrained(tiny_checkpoint("llama"), config, device="cpu").train(SFT_RECORDS, use_tqdm=False)
    checkpoint = tmp_path / "checkpoint-2"
    Trainer.from_pretrained(checkpoint, config, device="cpu").train(SFT_RECORDS, resume_from=checkpoint, use_tqdm=False)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["data", "step", "step", "resume", "step", "step", "end"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert events[0]["examples"] == 8 and events[0]["skipped_too_long"] == 0


def test_resume_refuses_different_data(tmp_path):
    config = TrainConfig(lr=1e-3, epochs=2, batch_size=4, save_steps=1, output_dir=str(tmp_path))
    Trainer.from_pretrained(tiny_checkpoint("llama"), config, device="cpu").train(SFT_RECORDS, use_tqdm=False)
    trainer = Trainer.from_pretrained(tmp_path / "checkpoint-1", config, device="cpu")
    with pytest.raises(InputError, match="num_examples=8, this run has num_examples=7"):
        trainer.train(SFT_RECORDS[:7], resume_from=tmp_path / "checkpoint-1", use_tqdm=False)


def test_too_long_examples_are_counted_in_the_result_and_metrics(tmp_path):
    records = SFT_RECORDS + [{"prompt": "Q", "completion": "The quick brown fox jumps over the lazy dog. " * 5}]
    config = TrainConfig(lr=1e-3, batch_size=4, max_length=32, truncation="skip", output_dir=str(tmp_path))
    result = Trainer.from_pretrained(tiny_checkpoint("llama"), config, device="cpu").train(records, use_tqdm=False)
    assert (result["examples"], result["skipped_too_long"], result["truncated"]) == (8, 1, 0)
    data = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert data["event"] == "data" and data["skipped_too_long"] == 1
    with pytest.raises(InputError, match="no examples to train on"):
        Trainer.from_pretrained(tiny_checkpoint("llama"), TrainConfig(max_length=4, truncation="skip"),
                                device="cpu").train(records[-1:], use_tqdm=False)


@pytest.mark.parametrize("field, value", [("objective", "ppo"), ("batch_size", 0), ("warmup", 2.5), ("lr", -1.0),
                                          ("truncation", "cut"), ("lr_schedule", "step")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(InputError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 3, 0.25])
def test_lr_schedule_matches_transformers(schedule, warmup):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from promptcot_engine.train.schedule import build_scheduler

    total = 17
    config = TrainConfig(lr=1e-3, warmup=warmup, lr_schedule=schedule)
    reference_fn = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2)]
    ours = build_scheduler(optimizers[0], config, total)
    reference = reference_fn(optimizers[1], num_warmup_steps=config.warmup_steps(total), num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        for optimizer, scheduler in zip(optimizers, (ours, reference)):
            optimizer.step()
            scheduler.step()


def test_trained_weights_hand_off_to_the_engine_scorer(tmp_path):
    """The EM loop's in-process handoff: the trained state dict loads into a running engine, whose scorer
    then gives the trained model's log-probs (transformers on the saved checkpoint as the reference) for the
    very token ids the trainer trained on."""
    from promptcot_engine import LLM
    from promptcot_engine.train import completion_token_ids
    from tests.test_train_dpo import transformers_logprob

    path = tiny_checkpoint("llama")
    llm = LLM(path, dtype="float32", device="cpu")
    records = SFT_RECORDS[:3]
    ids = [completion_token_ids(llm.tokenizer, r["completion"]) for r in records]
    before = [out.logprob_sum for out in llm.score([r["prompt"] for r in records], ids, use_tqdm=False)]
    trainer = Trainer.from_pretrained(path, TrainConfig(lr=1e-2, epochs=4, batch_size=4, output_dir=str(tmp_path)),
                                      device="cpu")
    trainer.train(SFT_RECORDS, use_tqdm=False)
    llm.load_weights(trainer.model.state_dict())
    after = llm.score([r["prompt"] for r in records], ids, use_tqdm=False)
    reference = hf_model(tmp_path)
    for record, record_ids, scored, old in zip(records, ids, after, before):
        assert scored.token_ids == record_ids
        want = transformers_logprob(reference, trainer.tokenizer, record["prompt"], record["completion"])
        assert scored.logprob_sum == pytest.approx(want, abs=1e-3)
        assert scored.logprob_sum > old + 5  # training on it made the completion far likelier
