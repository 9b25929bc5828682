"""Reference computations with transformers, shared by the tests."""
from __future__ import annotations

import torch

from promptcot_engine.attention.varlen import VarlenCausalAttention, cu_seqlens_from_lengths


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_gguf_model(gguf_path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype).eval()


def engine_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Full-vocabulary logits of the engine's decoder for several sequences packed into one forward."""
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, VarlenCausalAttention(cu_seqlens_from_lengths(lengths))))
    return list(logits.split(lengths))


def hf_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in sequences]


def hf_token_logprobs(model, context: list[int], continuation: list[int]) -> tuple[torch.Tensor, bool]:
    """transformers' fp32 log p(token | everything before it) for each continuation token, and whether every
    one is the argmax."""
    ids = torch.tensor([context + continuation], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].float()
    targets = torch.tensor(continuation, device=model.device)
    logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return logprobs.cpu(), bool((logits.argmax(-1) == targets).all())
