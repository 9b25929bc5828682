"""`promptcot bench score`: teacher-forced scoring, transformers (forward, full-vocabulary log_softmax, gather)
against LLM.score (prefix cache, chunked fused log-probs), on the same (context, continuation) pairs; each
side in its own process so its peak memory is its own.

Workload (the default): 64 pairs, 512-token contexts and 512-token continuations of random vocabulary ids,
every 8 pairs sharing a context, the layout of an E-step (K candidates per seed pair). transformers runs each
context group as one batch of 8, the way a plain implementation would. On CUDA the engine's side also times
the fused log-prob kernel at the model's LM head against the card's bf16 peak (benchmarks/logprob_kernel.py).
"""
from __future__ import annotations

import torch

from promptcot_engine.benchmarks.common import PeakMemory, machine, run_side, side_main, timed

MODULE = "promptcot_engine.benchmarks.score"


def bench_pairs(vocab_size: int, num_pairs: int, pairs_per_context: int, context_len: int, continuation_len: int):
    g = torch.Generator().manual_seed(0)
    low = min(1000, vocab_size // 4)  # clear of the special tokens at the start of the vocabulary
    contexts, continuations = [], []
    for i in range(num_pairs):
        if i % pairs_per_context == 0:
            context = torch.randint(low, vocab_size, (context_len,), generator=g).tolist()
        contexts.append(context)
        continuations.append(torch.randint(low, vocab_size, (continuation_len,), generator=g).tolist())
    return contexts, continuations


def _engine_side(args) -> dict:
    from promptcot_engine.engine.llm import LLM
    from promptcot_engine.engine.stats import EngineStats

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    contexts, continuations = bench_pairs(llm.engine.model.config.vocab_size, args.num_pairs, args.pairs_per_context,
                                          args.context_len, args.continuation_len)
    llm.score(contexts[:1], [continuations[0][:8]], use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    llm.engine.stats = EngineStats()  # count the measured work only
    memory = PeakMemory(llm.engine.device)
    with timed() as t:
        results = llm.score(contexts, continuations, use_tqdm=False)
    result = {"seconds": t["seconds"], "peak_extra_mb": memory.peak_extra_mb(),
              "logprob_sums": [r.logprob_sum for r in results],
              "prefilled_tokens": llm.engine.stats.prefilled_tokens}
    if llm.engine.device.type == "cuda":  # the log-prob kernel against the card, at the model's LM head
        from promptcot_engine.benchmarks.logprob_kernel import logprob_kernel_roofline

        # 8192 tokens: enough to fill the card, and the torch side's full logits (10 bytes a logit: the product,
        # its fp32 copy, the log-softmax) still fit beside the KV cache the engine holds
        tokens = min(8192, args.num_pairs * args.continuation_len)
        result["logprob_kernel"] = logprob_kernel_roofline(tokens, llm.engine.model.lm_head.weight)
    return result


def _transformers_side(args) -> dict:
    from promptcot_engine.benchmarks.hf_reference import load_hf_model
    from promptcot_engine.models.loader import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model = load_hf_model(args.model, resolve_dtype(args.dtype, device), device)
    contexts, continuations = bench_pairs(model.config.vocab_size, args.num_pairs, args.pairs_per_context,
                                          args.context_len, args.continuation_len)
    memory = PeakMemory(device)
    sums = []
    with timed() as t, torch.no_grad():
        for start in range(0, len(contexts), args.pairs_per_context):
            ids = torch.tensor([c + x for c, x in zip(contexts[start:start + args.pairs_per_context],
                                                      continuations[start:start + args.pairs_per_context])], device=device)
            logprobs = model(ids).logits.float().log_softmax(-1)[:, args.context_len - 1:-1]
            targets = ids[:, args.context_len:]
            sums += logprobs.gather(-1, targets[..., None]).squeeze(-1).sum(-1).tolist()
    return {"seconds": t["seconds"], "peak_extra_mb": memory.peak_extra_mb(), "logprob_sums": sums}


def run_score_bench(model: str = "smollm2-135m-instruct", num_pairs: int = 64, pairs_per_context: int = 8,
                    context_len: int = 512, continuation_len: int = 512, device: str = "auto", dtype: str = "auto",
                    compare_hf: bool = True) -> dict:
    common = ["--model", model, "--num-pairs", str(num_pairs), "--pairs-per-context", str(pairs_per_context),
              "--context-len", str(context_len), "--continuation-len", str(continuation_len), "--device", device,
              "--dtype", dtype]
    engine = run_side(MODULE, "engine", common)
    scored = num_pairs * continuation_len
    result = {"workload": f"{num_pairs} pairs, {context_len}-token contexts (each shared by {pairs_per_context} pairs), "
                          f"{continuation_len}-token continuations",
              "scored_tokens": scored, "engine_seconds": engine["seconds"], "engine_scored_tokens_per_s": scored / engine["seconds"],
              "engine_peak_extra_mb": engine["peak_extra_mb"], "engine_prefilled_tokens": engine["prefilled_tokens"],
              **engine.get("logprob_kernel", {}), **machine(device, dtype)}
    if compare_hf:
        hf = run_side(MODULE, "transformers", common)
        worst = max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(engine["logprob_sums"], hf["logprob_sums"]))
        result.update({"hf_seconds": hf["seconds"], "hf_scored_tokens_per_s": scored / hf["seconds"],
                       "hf_peak_extra_mb": hf["peak_extra_mb"],
                       "throughput_ratio": hf["seconds"] / engine["seconds"],
                       "peak_memory_ratio": engine["peak_extra_mb"] / hf["peak_extra_mb"],
                       "max_relative_sum_difference": worst})
    return result


def main() -> None:
    side_main(__doc__, _engine_side, _transformers_side, "num_pairs", "pairs_per_context", "context_len",
              "continuation_len")


if __name__ == "__main__":
    main()
