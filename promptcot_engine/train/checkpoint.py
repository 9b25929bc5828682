"""Training checkpoints: an HF directory (config.json, model.safetensors, tokenizer files) that
transformers and load_model both load, plus training_state.pt with what a resumed run needs to continue
the same loss curve: optimizer and scheduler states, every rank's RNG states, the step (which fixes the
data position, see sampler.py) and, for DPO, the reference log-probs. Written into a temporary
directory and renamed, so a checkpoint directory is complete or absent."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from promptcot_engine.errors import InputError
from promptcot_engine.models.decoder import DecoderForCausalLM
from promptcot_engine.models.hf_checkpoint import iter_safetensors, safetensors_files, save_hf_checkpoint
from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.models.weights import load_weights

TRAINING_STATE = "training_state.pt"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT_NAME.fullmatch(p.name)) and (p / TRAINING_STATE).is_file()]
    return max(steps)[1] if steps else None


def write_model(directory: str | Path, model: DecoderForCausalLM, state_dict: dict[str, torch.Tensor],
                tokenizer: Tokenizer | None) -> None:
    """The HF files into `directory` (which may hold other files, such as metrics.jsonl). state_dict: the
    full decoder state under transformers' names; a tied LM head is stored once."""
    if model.config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    save_hf_checkpoint(directory, model.config, state_dict, tokenizer)


def write_checkpoint(directory: str | Path, model: DecoderForCausalLM, state_dict: dict[str, torch.Tensor],
                     tokenizer: Tokenizer | None, training_state: dict) -> None:
    """A resumable checkpoint directory, complete or absent."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp, model, state_dict, tokenizer)
    torch.save(training_state, tmp / TRAINING_STATE)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)


def read_training_state(directory: str | Path) -> dict:
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise InputError(f"{path}: no such file (not a training checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_weights(model: DecoderForCausalLM, directory: str | Path) -> None:
    directory = Path(directory)
    load_weights(model, iter_safetensors(safetensors_files(directory)), str(directory))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
