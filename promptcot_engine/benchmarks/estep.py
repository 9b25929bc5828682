"""`promptcot bench estep`: one E-step on a fixed workload, N seed pairs x K rationales of at most L tokens
sampled from q, then every candidate scored under p (log p(z|c) + log p(x|z,c)), through the engine and, with
--compare hf, through transformers (generate with num_return_sequences=K, then a forward + log_softmax per
pair's K candidates) on the same prompts. Each side runs in its own process so its peak memory is its own.

Reports pairs/s, generated and scored tokens/s and peak memory; on GPU also the fraction of the HBM
bandwidth roofline the engine's decode steps reach (weights read once per step plus the KV entries read).
"""
from __future__ import annotations

import torch

from promptcot_engine.benchmarks.common import PeakMemory, machine, run_side, side_main, timed

MODULE = "promptcot_engine.benchmarks.estep"
# HBM bandwidth (bytes/s) of the cards the roofline knows, by a substring of torch.cuda.get_device_name()
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}


def bench_triples(num_pairs: int) -> list[dict]:
    from promptcot_engine.em.seeds import load_champ_seeds

    concepts = ["Modular arithmetic", "Counting principles", "Properties of polynomials", "Triangle geometry",
                "Inequalities"]
    return [{**s, "concepts": concepts[: 3 + i % 3], "level": "AIME", "rationale": "-"}
            for i, s in enumerate(load_champ_seeds(num_pairs))]


def _engine_side(args) -> dict:
    from promptcot_engine.em.config import EMConfig
    from promptcot_engine.em.estep import sample_and_score
    from promptcot_engine.engine.llm import LLM
    from promptcot_engine.engine.stats import EngineStats

    q = LLM(args.model, dtype=args.dtype, device=args.device, seed=0)
    p = LLM(args.model, dtype=args.dtype, device=args.device, seed=0)
    triples = bench_triples(args.num_pairs)
    config = EMConfig(k=args.k, max_tokens=args.max_tokens)
    sample_and_score(q, p, triples[:1], EMConfig(k=1, max_tokens=4), 0)  # warm-up
    for llm in (q, p):
        llm.engine.block_manager.reset_prefix_cache()
        llm.engine.stats = EngineStats()
    memory = PeakMemory(q.engine.device)
    with timed() as t:
        candidates = [c for cs in sample_and_score(q, p, triples, config, 1) for c in cs]
    qs, ps = q.engine.stats, p.engine.stats
    result = {"seconds": t["seconds"], "peak_extra_mb": memory.peak_extra_mb(),
              "generated_tokens": qs.generated_tokens, "scored_tokens": ps.prefilled_tokens,
              "generate_seconds": qs.prefill_seconds + qs.decode_seconds, "score_seconds": ps.prefill_seconds,
              "valid_candidates": sum(c["valid"] for c in candidates)}
    if q.engine.device.type == "cuda":
        result.update(_decode_roofline(q, qs))
    return result


def _decode_roofline(llm, stats) -> dict:
    """Bytes the decode steps had to read (the weights once per step, every cached K/V entry attended to)
    over their time, against the card's HBM bandwidth."""
    model = llm.engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mc = model.config
    kv_bytes_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * llm.engine.runner.kv_cache.element_size()
    moved = stats.decode_steps * weight_bytes + stats.decode_context_tokens * kv_bytes_per_token
    achieved = moved / stats.decode_seconds if stats.decode_seconds else 0.0
    name = torch.cuda.get_device_name()
    peak = next((bw for card, bw in HBM_BYTES_PER_S.items() if card in name), None)
    return {"decode_steps": stats.decode_steps, "decode_achieved_gb_per_s": achieved / 1e9,
            "decode_hbm_roofline_fraction": achieved / peak if peak else None}


def _transformers_side(args) -> dict:
    from promptcot_engine.benchmarks.hf_reference import left_padded, load_hf_model
    from promptcot_engine.em.templates import prompt_model_prompt, prompt_model_segments, rationale_model_prompt
    from promptcot_engine.models.loader import open_checkpoint, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model = load_hf_model(args.model, resolve_dtype(args.dtype, device), device)
    tok = open_checkpoint(args.model).tokenizer
    triples = bench_triples(args.num_pairs)
    pad = tok.eos_token_id or 0
    memory = PeakMemory(device)
    generated = scored = 0
    with timed() as t, torch.no_grad():
        prompts = [tok.encode(rationale_model_prompt(x["concepts"], x["level"], x["problem"], x["domain"])) for x in triples]
        ids, mask = left_padded(prompts, pad, device)
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=args.k, max_new_tokens=args.max_tokens, pad_token_id=pad)
        new = out[:, ids.shape[1]:].tolist()
        for i, x in enumerate(triples):
            context = tok.encode(prompt_model_prompt(x["concepts"], x["level"], x["domain"]))
            rows = []
            for sample in new[i * args.k:(i + 1) * args.k]:
                sample = sample[: sample.index(pad)] if pad in sample else sample
                generated += len(sample)
                z = tok.decode(sample, skip_special_tokens=True).strip() or "-"
                rows.append(context + [t for s in prompt_model_segments(z, x["problem"]) for t in tok.encode(s, add_special_tokens=False)])
            width = max(len(r) for r in rows)
            batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            logprobs = model(batch, attention_mask=attention).logits.float().log_softmax(-1)
            scored += sum(len(r) - len(context) for r in rows)
            _ = logprobs[:, :-1].gather(-1, batch[:, 1:, None])  # every token's log-prob, the engine's work too
    return {"seconds": t["seconds"], "peak_extra_mb": memory.peak_extra_mb(), "generated_tokens": generated,
            "scored_tokens": scored}


def run_estep_bench(model: str = "smollm2-135m-instruct", num_pairs: int = 16, k: int = 8, max_tokens: int = 256,
                    device: str = "auto", dtype: str = "auto", compare_hf: bool = False) -> dict:
    common = ["--model", model, "--num-pairs", str(num_pairs), "--k", str(k), "--max-tokens", str(max_tokens),
              "--device", device, "--dtype", dtype]
    engine = run_side(MODULE, "engine", common)
    result = {"workload": f"{num_pairs} seed pairs x K={k} rationales of at most {max_tokens} tokens, then scoring",
              "engine_seconds": engine["seconds"], "engine_pairs_per_s": num_pairs / engine["seconds"],
              "engine_generated_tokens_per_s": engine["generated_tokens"] / engine["generate_seconds"],
              # None when no candidate was valid (nothing scored), as with a random model's empty texts
              "engine_scored_tokens_per_s": (engine["scored_tokens"] / engine["score_seconds"]
                                             if engine["scored_tokens"] else None),
              "engine_peak_extra_mb": engine["peak_extra_mb"], "engine_valid_candidates": engine["valid_candidates"],
              **{f"engine_{k_}": v for k_, v in engine.items() if k_.startswith("decode")}, **machine(device, dtype)}
    if compare_hf:
        hf = run_side(MODULE, "transformers", common)
        result.update({"hf_seconds": hf["seconds"], "hf_pairs_per_s": num_pairs / hf["seconds"],
                       "hf_peak_extra_mb": hf["peak_extra_mb"], "hf_generated_tokens": hf["generated_tokens"],
                       "speedup_vs_hf": hf["seconds"] / engine["seconds"]})
    return result


def main() -> None:
    side_main(__doc__, _engine_side, _transformers_side, "num_pairs", "k", "max_tokens")


if __name__ == "__main__":
    main()
