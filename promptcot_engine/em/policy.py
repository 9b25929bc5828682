"""PolicyModel: one of the loop's two models (q or p), served by its own inference engine and trained in
place. After each SFT the trainer's weights go straight into the live engine with load_weights: models are
never reloaded from disk between sampling, scoring and training (checkpoints are written for resuming and
for users, not read back by the running loop)."""
from __future__ import annotations

from pathlib import Path

from promptcot_engine.em.config import EMConfig
from promptcot_engine.models.hf_checkpoint import save_hf_checkpoint
from promptcot_engine.models.loader import load_model
from promptcot_engine.train.config import TrainConfig
from promptcot_engine.train.distributed import training_device
from promptcot_engine.train.trainer import Trainer


class PolicyModel:
    def __init__(self, name: str, checkpoint: str | Path, config: EMConfig):
        self.name = name
        self.config = config
        self.llm = config.make_llm(checkpoint)
        # fp32 master weights for training (bf16 compute comes from the trainer's autocast on GPU)
        model, loaded = load_model(checkpoint, dtype="float32", device=training_device())
        self.checkpoint = loaded
        # one trainer for the run: under torchrun it shards the model once (FSDP2) and keeps it sharded
        self.trainer = Trainer(model, loaded.tokenizer)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def sft(self, examples: list[dict], lr: float, epochs: int) -> dict:
        c = self.config
        self.trainer.config = TrainConfig(lr=lr, epochs=epochs, batch_size=c.batch_size, max_length=c.max_length,
                                          warmup=c.warmup, seed=c.seed, bf16=c.train_bf16)
        metrics = self.trainer.train(examples)
        self.llm.load_weights(self.trainer.full_state_dict())
        metrics.pop("history", None)
        return metrics

    def checkpoint_state(self) -> dict:
        """The weights as a checkpoint stores them. Under torchrun gathering the shards is a collective:
        every rank calls this, though only the main rank writes."""
        state = dict(self.trainer.full_state_dict())
        if self.checkpoint.config.tie_word_embeddings:  # stored once, as transformers stores it
            state.pop("lm_head.weight", None)
        return state

    def save(self, directory: Path, state: dict) -> None:
        save_hf_checkpoint(directory, self.checkpoint.config, state, self.checkpoint.tokenizer)
