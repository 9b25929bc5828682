"""HF checkpoint directories: config.json, model.safetensors or a sharded model.safetensors.index.json,
tokenizer files; read and written."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from promptcot_engine.errors import InputError
from promptcot_engine.models.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: Path) -> list[Path]:
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise InputError(f"{index}: shard files missing: {', '.join(absent)}")
        return files
    raise InputError(f"{directory}: no weights (looked for {SINGLE_FILE} and {INDEX_FILE})")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{file}: unreadable safetensors file ({e})") from None


def read_generation_eos(directory: Path) -> list[int]:
    """eos ids from generation_config.json, which can differ from config.json's (Qwen2.5 lists two)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def save_hf_checkpoint(directory: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                       tokenizer=None, eos_token_ids: list[int] | None = None) -> None:
    """Write an HF directory that transformers' from_pretrained and this engine both load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state_dict.values()}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(dtype), indent=2) + "\n", encoding="utf-8")
    eos = eos_token_ids or config.eos_token_ids
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)
