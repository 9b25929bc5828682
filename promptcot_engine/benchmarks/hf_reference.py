"""transformers as the reference side of the benchmarks (a dev dependency, imported only here)."""
from __future__ import annotations

import torch

from promptcot_engine.models.loader import resolve_model_path


def load_hf_model(model: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if path.is_file():  # a GGUF: transformers dequantizes it the same way
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.to(device).eval()


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)
