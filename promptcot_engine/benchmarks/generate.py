"""`promptcot bench generate`: sampling throughput of the engine against transformers' generate, and both
against the machine's ceiling for the model's matrix products (benchmarks/products_ceiling.py)."""
from __future__ import annotations

import torch

from promptcot_engine.benchmarks.common import chat_prompts, machine, timed
from promptcot_engine.benchmarks.products_ceiling import products_ceiling, products_flops
from promptcot_engine.engine.llm import LLM
from promptcot_engine.sampling_params import SamplingParams


def run_generate_bench(model: str = "smollm2-135m-instruct", num_prompts: int = 16, n: int = 8, max_tokens: int = 128,
                       temperature: float = 1.0, compare_hf: bool = True, device: str = "auto", dtype: str = "auto",
                       seeded: bool = False) -> dict:
    """seeded: each request with its own seed, as the E-step and synthesis sample (transformers has no
    per-request seed; its side is the same either way)."""
    llm = LLM(model, device=device, dtype=dtype, seed=0)
    prompts = chat_prompts(llm.tokenizer, num_prompts)
    # every sample runs to max_tokens on both sides, so both generate exactly the same number of tokens
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                             seed=i if seeded else None) for i in range(num_prompts)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    stats = llm.engine.stats
    steps_before, seconds_before = stats.decode_steps, stats.decode_seconds
    with timed() as t:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    decode_steps = stats.decode_steps - steps_before  # none at max_tokens=1: the prefill samples the only token
    decode_ms = 1e3 * (stats.decode_seconds - seconds_before) / decode_steps if decode_steps else None
    result = {"workload": f"{num_prompts} prompts x n={n} x {max_tokens} new tokens, temperature {temperature}"
                          + (", a seed per request" if seeded else ""),
              "generated_tokens": tokens, "engine_seconds": t["seconds"], "engine_tokens_per_s": tokens / t["seconds"],
              "engine_ms_per_decode_step": decode_ms,
              "preemptions": llm.engine.scheduler.num_preemptions, **machine(device, dtype)}
    flops = products_flops(llm.engine.model, [len(p) for p in prompts], n, tokens)
    ceiling = products_ceiling(llm.engine.model, rows=min(num_prompts * n, llm.engine.config.max_num_seqs))
    result.update({"products_gflop": flops / 1e9, "engine_gflops": flops / t["seconds"] / 1e9,
                   "ceiling_gflops": ceiling / 1e9,
                   "engine_fraction_of_ceiling": flops / t["seconds"] / ceiling})
    if compare_hf:
        from promptcot_engine.benchmarks.hf_reference import left_padded, load_hf_model

        hf = load_hf_model(model, llm.engine.dtype, llm.engine.device)
        pad = llm.tokenizer.eos_token_id or 0
        ids, mask = left_padded(prompts, pad, llm.engine.device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, pad_token_id=pad)  # warm-up
            with timed() as t_hf:
                out = hf.generate(ids, attention_mask=mask, num_return_sequences=n, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, pad_token_id=pad, **sampling)
        hf_tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
        result.update({"hf_seconds": t_hf["seconds"], "hf_generated_tokens": hf_tokens,
                       "hf_tokens_per_s": hf_tokens / t_hf["seconds"]})
        result["speedup_vs_hf"] = result["engine_tokens_per_s"] / result["hf_tokens_per_s"]
        # transformers' time over the products' alone: what no implementation of them could beat here
        result["speedup_ceiling_vs_hf"] = t_hf["seconds"] / (flops / ceiling)
    return result
