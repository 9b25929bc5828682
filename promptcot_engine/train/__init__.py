"""Training: SFT and DPO with packed sequences, the fused linear cross-entropy loss, AdamW, HF-directory
checkpoints that resume exactly, and FSDP2 under torchrun. `Trainer` is the in-process API the EM loop
uses; `promptcot train` (commands.py) is the command line."""
from promptcot_engine.train.config import TrainConfig
from promptcot_engine.train.data import completion_token_ids
from promptcot_engine.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "completion_token_ids"]
