"""DPO: the trainer's loss, reward margin and accuracy equal a hand computation from transformers'
log-probs, with reference log-probs from the records or from the initial model; the margin grows."""
import math

import pytest
import torch
import torch.nn.functional as F

from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.train import TrainConfig, Trainer
from tests.reference import hf_model
from tests.tiny_checkpoints import tiny_checkpoint

PAIRS = [
    {"prompt": "Q: the area of triangle ABC?", "chosen": " It is 84.", "rejected": " It is 42."},
    {"prompt": "def solve(n):", "chosen": ["\n    return ", "n * n"], "rejected": "\n    pass"},
    {"prompt": "Let x be a real number", "chosen": " such that x^2 = 4.", "rejected": " such that x = x."},
]
BETA = 0.5


def transformers_logprob(model, tokenizer: Tokenizer, prompt: str, completion) -> float:
    """Sum of log p(completion token | everything before it): prompt with special tokens, each segment
    without, then EOS, as the records are documented to be tokenized."""
    segments = [completion] if isinstance(completion, str) else completion
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = [i for s in segments for i in tokenizer.encode(s, add_special_tokens=False)] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    token_logprobs = logprobs.gather(1, targets[:, None])[:, 0]
    return token_logprobs[len(prompt_ids) - 1:].sum().item()


def hand_dpo(policy, reference, tokenizer, pairs, given_refs=None) -> dict:
    losses, margins = [], []
    for k, pair in enumerate(pairs):
        pi_c, pi_r = (transformers_logprob(policy, tokenizer, pair["prompt"], pair[f]) for f in ("chosen", "rejected"))
        if given_refs is None:
            ref_c, ref_r = (transformers_logprob(reference, tokenizer, pair["prompt"], pair[f]) for f in ("chosen", "rejected"))
        else:
            ref_c, ref_r = given_refs[k]
        margin = BETA * ((pi_c - ref_c) - (pi_r - ref_r))
        margins.append(margin)
        losses.append(-F.logsigmoid(torch.tensor(margin, dtype=torch.float64)).item())
    n = len(pairs)
    return {"loss": sum(losses) / n, "reward_margin": sum(margins) / n, "accuracy": sum(m > 0 for m in margins) / n}


def assert_step_matches(step: dict, want: dict):
    assert step["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
    assert step["reward_margin"] == pytest.approx(want["reward_margin"], rel=1e-4, abs=1e-5)
    assert step["accuracy"] == want["accuracy"]


def test_dpo_loss_with_precomputed_reference_logprobs():
    path = tiny_checkpoint("llama")
    given = [(-66.0, -61.0), (-75.25, -55.0), (-70.0, -40.5)]
    records = [{**pair, "ref_chosen_logprob": c, "ref_rejected_logprob": r} for pair, (c, r) in zip(PAIRS, given)]
    trainer = Trainer.from_pretrained(path, TrainConfig(objective="dpo", dpo_beta=BETA, lr=1e-3, batch_size=3,
                                                         grad_accum=2), device="cpu")
    tokenizer = trainer.tokenizer
    want = hand_dpo(hf_model(path), None, tokenizer, PAIRS, given_refs=given)
    assert 0 < want["accuracy"] < 1 and abs(want["loss"] - math.log(2)) > 0.1  # a case that can tell
    assert_step_matches(trainer.train(records, use_tqdm=False)["history"][0], want)


def test_dpo_loss_against_the_frozen_initial_model(tmp_path):
    """Step 2's policy is the model after step 1 (saved as checkpoint-1); the reference stays the
    initial model."""
    path = tiny_checkpoint("qwen2")
    config = TrainConfig(objective="dpo", dpo_beta=BETA, lr=3e-3, epochs=2, batch_size=3, save_steps=1,
                         output_dir=str(tmp_path))
    trainer = Trainer.from_pretrained(path, config, device="cpu")
    history = trainer.train(PAIRS, use_tqdm=False)["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    want = hand_dpo(hf_model(tmp_path / "checkpoint-1"), hf_model(path), trainer.tokenizer, PAIRS)
    assert want["reward_margin"] != 0
    assert_step_matches(history[1], want)


def test_preference_margin_grows():
    config = TrainConfig(objective="dpo", dpo_beta=0.1, lr=3e-3, epochs=12, batch_size=3, lr_schedule="constant")
    history = Trainer.from_pretrained(tiny_checkpoint("llama"), config, device="cpu").train(PAIRS, use_tqdm=False)["history"]
    margins = [m["reward_margin"] for m in history]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[4] > margins[1] > 0 and margins[-1] > margins[4]
    assert history[-1]["accuracy"] == 1.0 and history[-1]["loss"] < history[0]["loss"] - 0.3


def test_reference_logprobs_from_the_engine_scorer_match_the_trainer():
    """What the self-play pipeline does: fill ref_*_logprob with the engine's scorer on
    completion_token_ids. At step 1 the policy is the reference, so the margin must then be 0 and the loss
    log 2, which holds only if the scorer and the trainer score the very same tokens."""
    from promptcot_engine import LLM
    from promptcot_engine.train import completion_token_ids

    path = tiny_checkpoint("llama")
    llm = LLM(path, dtype="float32", device="cpu")
    records = []
    for pair in PAIRS:
        chosen, rejected = llm.score([pair["prompt"]] * 2, [completion_token_ids(llm.tokenizer, pair[f])
                                                            for f in ("chosen", "rejected")], use_tqdm=False)
        records.append({**pair, "ref_chosen_logprob": chosen.logprob_sum, "ref_rejected_logprob": rejected.logprob_sum})
    config = TrainConfig(objective="dpo", dpo_beta=BETA, lr=1e-3, batch_size=3)
    step = Trainer.from_pretrained(path, config, device="cpu").train(records, use_tqdm=False)["history"][0]
    assert step["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-4)
