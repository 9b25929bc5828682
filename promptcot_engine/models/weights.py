"""Strict, streaming weight loading into a DecoderForCausalLM (shared by every checkpoint format and by
LLM.load_weights): each tensor is copied into its parameter as it arrives, so peak memory stays one tensor
above the model; missing, unexpected and mis-shaped tensors are all named in one error."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from promptcot_engine.errors import InputError

# buffers some older checkpoints carry that this decoder derives from the config instead
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_weights(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    expected = model.checkpoint_state_dict()
    tied = model.config.tie_word_embeddings
    seen, unexpected, misshaped = set(), [], []
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            target = expected.get(name)
            if target is None:
                unexpected.append(name)
                continue
            seen.add(name)
            if tuple(tensor.shape) != tuple(target.shape):
                misshaped.append(f"{name} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
                continue
            target.copy_(tensor)
    missing = sorted(set(expected) - seen)
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise InputError(f"{source}: weights do not match the model config; " + "; ".join(problems))
