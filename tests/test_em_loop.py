"""The EM loop end to end on a tiny checkpoint: outputs, the reward against transformers, argmax selection,
durability under kill -9, bad input, and data-parallel ranks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from promptcot_engine import LLM
from promptcot_engine.em.config import EMConfig
from promptcot_engine.em.estep import sample_and_score, select_winners
from promptcot_engine.em.run_store import RunStore
from promptcot_engine.em.templates import prompt_model_prompt, prompt_model_segments
from promptcot_engine.errors import InputError
from tests.reference import hf_model
from tests.tiny_checkpoints import tiny_checkpoint

# a tiny model learns the marker format in a few steps at this learning rate, so synthesis yields problems
TINY_RUN = dict(num_seeds=6, k=3, iterations=2, num_problems=20, max_tokens=24, synthesis_max_tokens=160,
                batch_size=3, cold_start_lr=1e-2, cold_start_epochs=30, em_lr=1e-3, synthesis_temperature=0.3,
                chunk_size=2, kv_cache_gb=0.25)


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "promptcot_engine.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, **kwargs)


def em_args(run_dir: Path, model: Path) -> list:
    args = ["em", "--model", model, "--run-dir", run_dir]
    for key, value in TINY_RUN.items():
        if key in ("num_seeds", "k", "iterations", "num_problems", "max_tokens", "synthesis_max_tokens", "batch_size",
                   "kv_cache_gb"):
            args += [f"--{key.replace('_', '-')}", value]
    return args


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("em") / "tiny.toml"
    rest = {k: v for k, v in TINY_RUN.items()
            if k in ("cold_start_lr", "cold_start_epochs", "em_lr", "chunk_size", "synthesis_temperature")}
    path.write_text("".join(f"{k} = {v}\n" for k, v in rest.items()))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_config_file):
    run_dir = tmp_path_factory.mktemp("em") / "reference"
    result = cli(*em_args(run_dir, tiny_checkpoint("llama")), "--config", tiny_config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_whole_loop_writes_every_output(reference_run):
    run_dir, result = reference_run
    assert "problems:" in result.stdout and str(run_dir) in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["k"] == 3 and config["cold_start_epochs"] == 30
    metrics = read(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["candidates"] == 6 * 3 and m["valid_candidates"] > 0
        assert m["best_reward"] >= m["mean_reward"] and m["nll_x"] > 0 and m["rationale_tokens"] > 0
    for name in ("reward.png", "nll_x.png", "rationale_length.png", "sft_loss.png"):
        assert (run_dir / "plots" / name).stat().st_size > 0
    candidates = read(run_dir / "iter_1" / "candidates.jsonl")
    winners = read(run_dir / "iter_1" / "winners.jsonl")
    for w in winners:  # the winner is the argmax of its pair's valid candidates
        pair = [c for c in candidates if c["id"] == w["id"] and c["valid"]]
        assert w["reward"] == max(c["reward"] for c in pair)
    problems = read(run_dir / "problems.jsonl")
    outputs = read(run_dir / "synthesis" / "outputs.jsonl")
    assert len(outputs) == 20 and problems, "the tiny prompt model should have learned the markers"
    for p in problems:
        assert set(p) >= {"prompt", "problem", "rationale", "concepts", "level", "iteration"}
        assert p["iteration"] == 2 and p["prompt"] == prompt_model_prompt(p["concepts"], p["level"], p["domain"])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"]["synthesis"]["valid"] == sum(o["valid"] for o in outputs)
    # keep_checkpoints = 2: iterations 1 and 2 remain, the cold start's were pruned
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_1", "iter_2"]


def test_reward_equals_transformers_terms():
    path = tiny_checkpoint("qwen2")
    q = LLM(path, dtype="float32", device="cpu", seed=0)
    p = LLM(path, dtype="float32", device="cpu", seed=0)
    triples = [{"id": "a", "problem": "Find x if 2x + 3 = 11.", "concepts": ["Linear equations", "Arithmetic"],
                "level": "AMC12", "domain": "math", "rationale": "seed"},
               {"id": "b", "problem": "Count the subsets of a 5-element set.", "concepts": ["Combinatorics"],
                "level": "AIME", "domain": "math", "rationale": "seed"}]
    config = EMConfig(k=3, max_tokens=20)
    candidates = [c for cs in sample_and_score(q, p, triples, config, iteration=1) for c in cs]
    ref = hf_model(path)
    tok = p.tokenizer
    for c in candidates:
        if not c["valid"]:
            continue
        t = next(t for t in triples if t["id"] == c["id"])
        context = tok.encode(prompt_model_prompt(t["concepts"], t["level"], t["domain"]))
        segments = [tok.encode(s, add_special_tokens=False) for s in prompt_model_segments(c["rationale"], t["problem"])]
        ids = context + [i for s in segments for i in s]
        with torch.no_grad():
            logprobs = ref(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        token_logprobs = logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        starts = [len(context) + sum(len(s) for s in segments[:i]) for i in range(len(segments))]
        span = lambda i: token_logprobs[starts[i] - 1:starts[i] - 1 + len(segments[i])].sum().item()  # noqa: E731
        assert abs(c["log_p_z"] - span(1)) < 1e-3
        assert abs(c["log_p_x_given_z"] - span(3)) < 1e-3
        assert abs(c["reward"] - (span(1) + span(3))) < 2e-3


def test_argmax_selection():
    triples = [{"id": i, "rationale": f"old {i}"} for i in ("a", "b", "c")]
    cand = lambda i, k, r, valid=True: {"id": i, "k": k, "rationale": f"{i}{k}", "reward": r, "valid": valid,  # noqa: E731
                                       "log_p_z": r, "log_p_x_given_z": 0.0, "rationale_tokens": 1, "problem_tokens": 1}
    candidates = [cand("a", 0, -5.0), cand("a", 1, -2.0), cand("a", 2, -2.0), cand("a", 3, 9.0, valid=False),
                  cand("b", 0, None, valid=False), cand("c", 0, -1.0)]
    winners, unchanged = select_winners(triples, candidates)
    assert [w["rationale"] for w in winners] == ["a1", "old b", "c0"]  # a tie goes to the lowest k
    assert unchanged == 1 and winners[1]["reward"] is None


def test_the_loops_engines_take_a_share_of_the_gpu_each():
    """q's and p's engines live side by side with their trainers: each takes the configured share, not 0.9."""
    llm = EMConfig(kv_cache_gb=0.25).make_llm(str(tiny_checkpoint("llama")))
    assert llm.engine.config.gpu_memory_utilization == EMConfig().gpu_memory_utilization < 0.5
    assert EMConfig(gpu_memory_utilization=0.45).make_llm(str(tiny_checkpoint("llama"))).engine.config \
        .gpu_memory_utilization == 0.45
    for bad in (0, 1.5, "half"):
        with pytest.raises(InputError, match="gpu_memory_utilization"):
            EMConfig(gpu_memory_utilization=bad)


def output_ids(run_dir: Path) -> dict:
    files = {"seeds": "seeds.jsonl", "triples": "annotate/triples.jsonl", "candidates1": "iter_1/candidates.jsonl",
             "winners1": "iter_1/winners.jsonl", "rationales1": "iter_1/rationales.jsonl",
             "candidates2": "iter_2/candidates.jsonl", "outputs": "synthesis/outputs.jsonl", "problems": "problems.jsonl"}
    return {name: [(r["id"], r.get("k"), r.get("rationale")) for r in read(run_dir / f)] for name, f in files.items()}


@pytest.mark.slow
def test_resume_after_kill_loses_and_duplicates_nothing(reference_run, tmp_path, tiny_config_file):
    """kill -9 as soon as each of several points is reached, rerun the same command each time; the records
    (ids, sample indices, texts) equal the uninterrupted run's."""
    reference_dir, _ = reference_run
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "promptcot_engine.cli", *map(str, em_args(run_dir, tiny_checkpoint("llama"))),
            "--config", str(tiny_config_file)]
    kill_points = ["annotate/parts/part-00001.jsonl", "checkpoints/iter_0/q", "iter_1/estep/parts/part-00000.jsonl",
                   "iter_1/winners.jsonl", "checkpoints/iter_1/p", "synthesis/parts/part-00002.jsonl"]
    kills = 0
    for point in kill_points:
        if (run_dir / point).exists():
            continue
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and not (run_dir / point).exists():
            time.sleep(0.01)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
    assert kills >= 3
    final = subprocess.run(args, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert output_ids(run_dir) == output_ids(reference_dir)
    assert not list(run_dir.rglob("*.tmp"))  # no temporary file left behind


def test_malformed_seed_line_is_an_error_and_nothing_is_lost(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"problem": "What is 1 + 1?"}\n{"problem": "What is 2 + 2?"}\n{"problem": 3\n')
    run_dir = tmp_path / "run"
    result = cli("em", "--model", tiny_checkpoint("llama"), "--seeds", seeds, "--run-dir", run_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {seeds}:3:")
    # a stage command with a bad input line leaves an existing output untouched
    triples = tmp_path / "triples.jsonl"
    triples.write_text('{"id": "a", "problem": "p", "concepts": ["c"], "level": "AIME", "rationale": "z"}\n'
                       '{"id": "b", "problem": "p", "concepts": "not a list", "level": "AIME", "rationale": "z"}\n')
    output = tmp_path / "candidates.jsonl"
    output.write_text('{"kept": true}\n')
    model = tiny_checkpoint("llama")
    result = cli("estep", "--rationale-model", model, "--prompt-model", model, "--input", triples, "--output", output)
    assert result.returncode == 2 and f"{triples}:2" in result.stderr and "concepts" in result.stderr
    assert output.read_text() == '{"kept": true}\n'


def test_run_dir_with_other_settings_is_refused(reference_run):
    run_dir, _ = reference_run
    result = cli("em", "--model", tiny_checkpoint("llama"), "--run-dir", run_dir, "--k", 5)
    assert result.returncode == 2 and "other settings" in result.stderr


@pytest.mark.slow
def test_two_ranks_give_the_same_records_as_one(tmp_path):
    """E-step and synthesis sharded over 2 CPU ranks (gloo) write what one process writes."""
    model = tiny_checkpoint("llama")
    triples = tmp_path / "triples.jsonl"
    problems = ["Find x if 2x + 3 = 11.", "How many primes are below 30?", "Count subsets of a 4-set.",
                "Sum the first 10 odd numbers.", "Find the inradius of a 3-4-5 triangle."]
    triples.write_text("".join(json.dumps({"id": f"t{i}", "problem": p, "concepts": [f"concept {i}", "algebra"],
                                           "level": "AIME", "rationale": "seed"}) + "\n" for i, p in enumerate(problems)))
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"candidates_{ranks}.jsonl"
        synth = tmp_path / f"problems_{ranks}.jsonl"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                    str(29500 + ranks)]
        for stage in (["estep", "--rationale-model", model, "--prompt-model", model, "--input", triples, "--output", out,
                       "--k", 3, "--max-tokens", 16],
                      ["synthesize", "--prompt-model", model, "--concepts-from", triples, "--num-problems", 6,
                       "--synthesis-max-tokens", 16, "--output", synth]):
            result = subprocess.run([*launcher, "-m", "promptcot_engine.cli", *map(str, stage)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
        runs[ranks] = read(out), synth.read_text()
    (one, synth_one), (two, synth_two) = runs[1], runs[2]
    assert [(c["id"], c["k"], c["rationale"]) for c in one] == [(c["id"], c["k"], c["rationale"]) for c in two]
    assert all(abs(a["reward"] - b["reward"]) < 1e-3 for a, b in zip(one, two) if a["valid"])
    assert synth_one == synth_two


@pytest.mark.slow
def test_whole_loop_on_two_ranks_writes_what_one_rank_writes(reference_run, tmp_path, tiny_config_file):
    """`promptcot em` under torchrun: sharded sampling and scoring, FSDP2 training on both ranks, checkpoints
    gathered by both and written by one; the records equal the one-process run's, and one summary is printed."""
    reference_dir, _ = reference_run
    run_dir = tmp_path / "two_ranks"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29513"]
    result = subprocess.run([*launcher, "-m", "promptcot_engine.cli", *map(str, em_args(run_dir, tiny_checkpoint("llama"))),
                             "--config", str(tiny_config_file)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    def records(directory):
        # sharded training sums gradients in another order, so rewards move in the last bits: two candidates
        # with the same text may swap as the winner, which changes its sample index and nothing else
        ids = output_ids(directory)
        ids["winners1"] = [(i, rationale) for i, _, rationale in ids["winners1"]]
        return ids

    assert records(run_dir) == records(reference_dir)
    assert result.stdout.count("run directory:") == 1
    assert (run_dir / "checkpoints" / "iter_2" / "p" / "model.safetensors").is_file()


def test_stale_temporary_files_of_a_killed_write_are_removed_on_resume(tmp_path):
    """A kill -9 between a temporary file's creation and its rename leaves `.name.XXXX.tmp` behind: opening the
    run directory again removes it, and only it."""
    (tmp_path / "iter_1" / "estep").mkdir(parents=True)
    stale = [tmp_path / ".state.json.og79dz0s.tmp", tmp_path / "iter_1" / "estep" / ".part-00003.jsonl.ab12cd.tmp"]
    kept = [tmp_path / "iter_1" / "estep" / "part-00002.jsonl", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_text("{}\n")
    RunStore(tmp_path)
    assert [p.exists() for p in stale + kept] == [False, False, True, True]
