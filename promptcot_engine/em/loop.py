"""The PromptCoT 2.0 EM loop, end to end, durable: cold start, E-step, M-step (x iterations), synthesis, dedup.

Run directory (every file written through a temporary file and an atomic rename):
    config.json                     the resolved EMConfig
    state.json                      the stages done, with their counts
    seeds.jsonl                     the seed problems used
    annotate/triples.jsonl          (c, z, x) from the teacher (parts/ while running)
    iter_N/candidates.jsonl         every E-step candidate with log p(z|c), log p(x|z,c) and the reward
    iter_N/winners.jsonl            the argmax rationale of each (c, x)
    iter_N/rationales.jsonl         the M-step's greedy rationales
    checkpoints/iter_N/{q,p}        HF checkpoints (iter_0: the cold start); the last keep_checkpoints kept
    metrics.jsonl                   one line per iteration
    plots/*.png                     the metrics over iterations
    synthesis/outputs.jsonl         every synthesized output, parsed, with "valid"
    problems.jsonl                  the final deduplicated problems

A rerun of the same command after a kill at any point skips what is done and resumes chunked stages part by
part; a training stage that was cut short starts over from the last checkpoint.
"""
from __future__ import annotations

import gc
import json
import shutil

import torch

from promptcot_engine.em.annotate import annotate_seeds
from promptcot_engine.em.concept_sampling import sample_concept_sets
from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.dedup import dedup
from promptcot_engine.em.estep import prompt_model_examples, rationale_examples, sample_and_score, select_winners
from promptcot_engine.em.metrics import iteration_metrics, plot_metrics
from promptcot_engine.em.mstep import greedy_rationales
from promptcot_engine.em.policy import PolicyModel
from promptcot_engine.em.run_store import RunStore
from promptcot_engine.em.seeds import load_seeds
from promptcot_engine.em.sharding import Sharding
from promptcot_engine.em.synthesize import final_problem, generate_problems, synthesis_requests
from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import atomic_write_text
from promptcot_engine.models.loader import resolve_device

# settings that may change between a run and its resumption without changing what was already computed
_RESUMABLE_CHANGES = {"run_dir", "device", "dtype", "kv_cache_gb", "gpu_memory_utilization", "max_num_seqs",
                      "iterations", "num_problems", "synthesis_max_tokens", "keep_checkpoints"}


class EMRun:
    def __init__(self, config: EMConfig, log=print):
        self.config = config
        device = resolve_device(config.device)
        self.store = RunStore(config.run_dir, Sharding(device))
        self.log = log if self.store.sharding.is_main else (lambda message: None)  # one voice under torchrun
        self._check_config()
        self.q: PolicyModel | None = None
        self.p: PolicyModel | None = None

    def _check_config(self) -> None:
        path = self.store.path("config.json")
        if path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            changed = sorted(k for k, v in self.config.to_dict().items()
                             if k not in _RESUMABLE_CHANGES and previous.get(k) != v)
            if changed:
                raise InputError(f"{path}: this run directory holds a run with other settings ({', '.join(changed)}); "
                                 "use a new --run-dir or the same settings to resume")
        if self.store.sharding.is_main:
            atomic_write_text(path, self.config.to_json())

    # ---- stages ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        triples = self.annotate(self.seeds())
        if not triples:
            raise InputError("no seed got a rationale from the teacher: nothing to train on")
        self.cold_start(triples)
        metrics = []
        for iteration in range(1, c.iterations + 1):
            metrics.append(self.iteration(iteration, triples))
            self._write_metrics(metrics)
        return self.summary(metrics, self.synthesize(triples))

    def seeds(self) -> list[dict]:
        if not self.store.is_done("seeds"):
            seeds = load_seeds(self.config.seeds, self.config.num_seeds)
            self.store.write_jsonl("seeds.jsonl", seeds)
            self.store.mark_done("seeds", count=len(seeds))
        return self.store.read_jsonl("seeds.jsonl")

    def annotate(self, seeds: list[dict]) -> list[dict]:
        if not self.store.is_done("annotate"):
            c = self.config
            self.log(f"cold start: annotating {len(seeds)} seeds with the teacher {c.teacher_model}")
            teacher = c.make_llm(c.teacher_model)
            triples = self.store.chunked("annotate", seeds, lambda chunk: annotate_seeds(teacher, chunk, c), c.chunk_size)
            del teacher
            gc.collect()
            self.store.write_jsonl("annotate/triples.jsonl", triples)
            self.store.mark_done("annotate", seeds=len(seeds), triples=len(triples), dropped=len(seeds) - len(triples),
                                 concept_fallbacks=sum(t["concept_source"] == "fallback" for t in triples),
                                 level_defaults=sum(t["level_source"] == "default" for t in triples))
        return self.store.read_jsonl("annotate/triples.jsonl")

    def _models(self) -> tuple[PolicyModel, PolicyModel]:
        """q and p, built once from their latest checkpoints (the cold start's model before any)."""
        if self.q is None:
            state = self.store.state.setdefault("models", {})
            self.q = PolicyModel("q", state.get("q", self.config.model), self.config)
            self.p = PolicyModel("p", state.get("p", self.config.model), self.config)
        return self.q, self.p

    def _train(self, stage: str, which: str, examples: list[dict], lr: float, epochs: int, iteration: int) -> dict:
        if self.store.is_done(stage):
            return self.store.info(stage)
        q, p = self._models()
        model = q if which == "q" else p
        self.log(f"{stage}: SFT of {which} on {len(examples)} examples (lr {lr}, {epochs} epoch(s))")
        metrics = model.sft(examples, lr, epochs)
        state = model.checkpoint_state()  # every rank takes part; only the main rank writes
        directory = self.store.replace_dir(f"checkpoints/iter_{iteration}/{which}", lambda d: model.save(d, state))
        self.store.state.setdefault("models", {})[which] = str(directory)
        self.store.mark_done(stage, **metrics)
        self._prune_checkpoints(iteration)
        return metrics

    def cold_start(self, triples: list[dict]) -> None:
        c = self.config
        self._train("cold_start/q", "q", rationale_examples(triples), c.cold_start_lr, c.cold_start_epochs, 0)
        self._train("cold_start/p", "p", prompt_model_examples(triples), c.cold_start_lr, c.cold_start_epochs, 0)

    def iteration(self, iteration: int, triples: list[dict]) -> dict:
        c = self.config
        stage = f"iter_{iteration}"
        # the (c, x) pairs carry the previous iteration's winning rationale as their fallback
        previous = self.store.read_jsonl(f"iter_{iteration - 1}/winners.jsonl") if iteration > 1 else triples
        if not self.store.is_done(f"{stage}/estep"):
            q, p = self._models()
            self.log(f"{stage}: E-step, {c.k} rationales for each of {len(previous)} pairs, scored by p")
            candidates = self.store.chunked(f"{stage}/estep", previous,
                                            lambda chunk: sample_and_score(q.llm, p.llm, chunk, c, iteration), c.chunk_size)
            winners, unchanged = select_winners(previous, candidates)
            self.store.write_jsonl(f"{stage}/candidates.jsonl", candidates)
            self.store.write_jsonl(f"{stage}/winners.jsonl", winners)
            self.store.mark_done(f"{stage}/estep", candidates=len(candidates), unchanged=unchanged)
        candidates = self.store.read_jsonl(f"{stage}/candidates.jsonl")
        winners = self.store.read_jsonl(f"{stage}/winners.jsonl")
        q_metrics = self._train(f"{stage}/estep_train", "q", rationale_examples(winners), c.em_lr, c.em_epochs, iteration)

        if not self.store.is_done(f"{stage}/mstep"):
            q, _ = self._models()
            self.log(f"{stage}: M-step, greedy rationales from the updated q")
            rationales = self.store.chunked(f"{stage}/mstep", winners,
                                            lambda chunk: greedy_rationales(q.llm, chunk, c, iteration), c.chunk_size)
            self.store.write_jsonl(f"{stage}/rationales.jsonl", rationales)
            self.store.mark_done(f"{stage}/mstep", rationales=len(rationales))
        rationales = self.store.read_jsonl(f"{stage}/rationales.jsonl")
        p_metrics = self._train(f"{stage}/mstep_train", "p", prompt_model_examples(rationales), c.em_lr, c.em_epochs,
                                iteration)
        unchanged = self.store.info(f"{stage}/estep")["unchanged"]
        return iteration_metrics(iteration, candidates, winners, rationales, q_metrics, p_metrics, unchanged)

    def synthesize(self, triples: list[dict]) -> list[dict]:
        c = self.config
        if not self.store.is_done("synthesis"):
            _, p = self._models()
            requests = synthesis_requests(sample_concept_sets(triples, c.num_problems, c.seed, c.num_concepts))
            self.log(f"synthesis: {len(requests)} concept sets to the prompt model")
            outputs = self.store.chunked("synthesis", requests,
                                         lambda chunk: generate_problems(p.llm, chunk, c, c.iterations), c.chunk_size)
            self.store.write_jsonl("synthesis/outputs.jsonl", outputs)
            self.store.mark_done("synthesis", requests=len(requests), valid=sum(o["valid"] for o in outputs),
                                 dropped_missing_markers=sum(not o["valid"] for o in outputs))
        if not self.store.is_done("dedup"):
            outputs = self.store.read_jsonl("synthesis/outputs.jsonl")
            kept, stats = dedup([final_problem(o) for o in outputs if o["valid"]], key="problem")
            self.store.write_jsonl("problems.jsonl", kept)
            self.store.mark_done("dedup", **stats)
        return self.store.read_jsonl("problems.jsonl")

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _write_metrics(self, metrics: list[dict]) -> None:
        if self.store.sharding.is_main:
            atomic_write_text(self.store.path("metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
            plot_metrics(metrics, self.store.path("plots"))
        self.store.sharding.barrier()

    def _prune_checkpoints(self, iteration: int) -> None:
        if not self.store.sharding.is_main:
            return
        root = self.store.path("checkpoints")
        current = set(self.store.state.get("models", {}).values())
        for old in range(0, iteration - self.config.keep_checkpoints + 1):
            directory = root / f"iter_{old}"
            if directory.is_dir() and not any(str(directory / m) in current for m in ("q", "p")):
                shutil.rmtree(directory)

    def summary(self, metrics: list[dict], problems: list[dict]) -> dict:
        s = self.store
        return {"run_dir": str(s.run_dir), "seeds": s.info("seeds")["count"], "annotate": s.info("annotate"),
                "iterations": metrics, "synthesis": s.info("synthesis"), "dedup": s.info("dedup"),
                "problems": len(problems), "problems_file": str(s.path("problems.jsonl"))}


def format_summary(summary: dict) -> str:
    a, syn, d = summary["annotate"], summary["synthesis"], summary["dedup"]
    lines = [f"run directory: {summary['run_dir']}",
             f"seeds: {summary['seeds']} ({a['triples']} annotated, {a['dropped']} dropped without a rationale, "
             f"{a['concept_fallbacks']} concept fallbacks)"]
    for m in summary["iterations"]:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"iteration {m['iteration']}: mean reward {fmt(m['mean_reward'])}, best {fmt(m['best_reward'])}, "
                     f"NLL(x) {fmt(m['nll_x'])}, rationale {fmt(m['rationale_tokens'])} tokens, "
                     f"{m['valid_candidates']}/{m['candidates']} valid candidates")
    lines.append(f"synthesis: {syn['requests']} requests, {syn['valid']} with both marker pairs, "
                 f"{syn['dropped_missing_markers']} dropped")
    lines.append(f"dedup: {d['exact_duplicates']} exact and {d['near_duplicates']} near duplicates removed")
    lines.append(f"problems: {summary['problems']} in {summary['problems_file']}")
    return "\n".join(lines)


def run_em(config: EMConfig, log=print) -> dict | None:
    """The whole loop; the summary on the main rank, None on the others under torchrun."""
    torch.manual_seed(config.seed)
    run = EMRun(config, log)
    summary = run.run()
    return summary if run.store.sharding.is_main else None
