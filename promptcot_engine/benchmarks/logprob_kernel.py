"""The fused log-prob kernel (kernels/fused_logprob.py) against the card: its achieved TFLOP/s at an LM head's
shape as a fraction of the GPU's dense bf16 peak, beside what it replaces on the same input: the full logits
in the input's dtype, an fp32 log_softmax and a gather (transformers' scoring). The LM-head product is
2 * tokens * hidden * vocab FLOPs; everything else the kernel does is a few operations per logit on data
that never leaves the chip, so the product's rate is the measure."""
from __future__ import annotations

import torch

from promptcot_engine.kernels.fused_logprob import fused_linear_logprob

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets; the first name the device's
# contains wins, so the more specific ones come first
BF16_DENSE_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "H100": 989.4,
                     "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((peak for card, peak in BF16_DENSE_TFLOPS.items() if card in device_name), None)


def torch_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The plain computation: the full logits, log_softmax in fp32, gather, argmax."""
    logits = hidden @ weight.T
    logprobs = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return logprobs, logits.argmax(-1) == targets


def cuda_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median seconds of a call, peak bytes it allocates beyond what is held before it), CUDA events."""
    fn()  # compiles and autotunes outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() - held


def logprob_inputs(tokens: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hidden states [tokens, hidden] in the weight's dtype and random targets, on its device."""
    vocab, hidden_size = weight.shape
    g = torch.Generator(weight.device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, device=weight.device).to(weight.dtype)
    return hidden, torch.randint(0, vocab, (tokens,), generator=g, device=weight.device)


def logprob_kernel_roofline(tokens: int, weight: torch.Tensor, repeats: int = 10) -> dict:
    """The kernel and the torch computation on `tokens` random hidden states through `weight` [vocab, hidden]
    (an LM head on a CUDA device), with random targets."""
    vocab, hidden_size = weight.shape
    hidden, targets = logprob_inputs(tokens, weight)
    flops = 2 * tokens * hidden_size * vocab
    kernel_s, kernel_bytes = cuda_seconds(lambda: fused_linear_logprob(hidden, weight, targets), repeats)
    torch_s, torch_bytes = cuda_seconds(lambda: torch_linear_logprob(hidden, weight, targets), repeats)
    name = torch.cuda.get_device_name(weight.device)
    peak = bf16_peak_tflops(name)
    tflops = flops / kernel_s / 1e12
    return {"logprob_kernel_shape": f"{tokens} tokens x hidden {hidden_size} x vocab {vocab}, {weight.dtype}",
            "logprob_kernel_tflops": tflops, "logprob_torch_tflops": flops / torch_s / 1e12,
            "logprob_kernel_vs_torch": torch_s / kernel_s, "bf16_peak_tflops": peak,
            "logprob_kernel_of_peak": tflops / peak if peak else None,
            "logprob_kernel_extra_mb": kernel_bytes / 2**20, "logprob_torch_extra_mb": torch_bytes / 2**20}
