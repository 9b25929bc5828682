"""Self-play data pipeline and teacher-distilled SFT data.

Verification, filter and pairing run on crafted rollouts with known outcomes. Where the engine must
generate, a crafted checkpoint writes a known text: a one-layer Llama whose attention and MLP outputs
are zero, so each next token depends only on the current one (a bigram chain), spelling
"\\boxed{7}." (probability 1/4) or "\\boxed{8}." (3/4) after the chat template's generation prompt.
Reference log-probs are checked against transformers on a random tiny checkpoint.
"""
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from promptcot_engine.cli import main
from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import read_jsonl, write_jsonl
from promptcot_engine.selfplay.pairs import (add_reference_logprobs, build_pairs, passes_difficulty_filter,
                                             verify_math, verify_rollouts)
from promptcot_engine.selfplay.rollouts import (consistent_tests, generate_rollouts, read_problems, read_rollouts,
                                                solution_request)
from promptcot_engine.selfplay.sft_data import build_sft_data
from tests.reference import hf_model
from tests.tiny_checkpoints import tiny_tokenizer_dir

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.05)
CLI_ENGINE = ["--dtype", "float32", "--device", "cpu", "--kv-cache-gb", "0.05"]


def record(texts, answer=None, domain="math", finish=None, record_id="p"):
    finish = finish or ["stop"] * len(texts)
    return {"id": record_id, "problem": f"problem {record_id}", "answer": answer, "domain": domain,
            "prompt": f"<prompt {record_id}>",
            "rollouts": [{"text": t, "finish_reason": f, "num_tokens": len(t)} for t, f in zip(texts, finish)]}


def passed(verified):
    return [r["passed"] for r in verified["rollouts"]]


# ---- math verification, filter, pairs ---------------------------------------------------------------------

def test_math_equivalent_spellings_pass_and_cut_rollouts_fail():
    verified = verify_math(record([
        "so x = \\boxed{\\frac{1}{2}}",
        "first \\boxed{3}, no wait: \\boxed{0.5}",  # the last box counts
        "\\boxed{\\dfrac12}",
        "\\boxed{2}",
        "the answer is one half",
        "\\boxed{1/2}",  # cut at max_tokens: unfinished, never passes
    ], answer="1/2", finish=["stop"] * 5 + ["length"]))
    assert passed(verified) == [True, True, True, False, False, False]
    assert [r["extracted"] for r in verified["rollouts"]] == ["\\frac{1}{2}", "0.5", "\\dfrac12", "2", None, None]
    assert verified["num_passed"] == 3
    assert (verified["reference"], verified["reference_source"]) == ("1/2", "answer")


def test_majority_vote_is_the_reference_without_an_answer():
    texts = ["\\boxed{6}", "\\boxed{5}", "\\boxed{6.0}", "\\boxed{5}", "\\boxed{\\frac{12}{2}}", "\\boxed{7}", "no box",
             "\\boxed{6}"]
    # the last rollout was cut: if it voted, 6 would win 4 of 8 and the problem would be dropped
    verified = verify_math(record(texts, finish=["stop"] * 7 + ["length"]))
    assert (verified["reference"], verified["reference_source"]) == ("6", "majority_vote")
    assert passed(verified) == [True, False, True, False, True, False, False, False]
    pairs, stats = build_pairs([verified])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("\\boxed{6}", "\\boxed{5}"), ("\\boxed{6.0}", "\\boxed{5}"), ("\\boxed{\\frac{12}{2}}", "\\boxed{7}")]
    assert stats["kept"] == 1

    nobody_answered = verify_math(record(["no box"] * 8))
    assert nobody_answered["reference"] is None and nobody_answered["num_passed"] == 0


def test_filter_drops_all_none_and_half_and_pairs_the_rest():
    def problem(num_right, record_id):
        texts = [f"{i}: \\boxed{{42}}" for i in range(num_right)] + [f"{i}: \\boxed{{41}}" for i in range(8 - num_right)]
        return verify_math(record(texts, answer="42", record_id=record_id))

    records = [problem(8, "all"), problem(0, "none"), problem(4, "half"), problem(3, "three"), problem(1, "one")]
    assert [r["num_passed"] for r in records] == [8, 0, 4, 3, 1]
    pairs, stats = build_pairs(records)
    assert stats == {"problems": 5, "dropped_none_solved": 1, "dropped_half_or_more_solved": 2, "kept": 2, "pairs": 4}
    assert [p["problem_id"] for p in pairs] == ["three"] * 3 + ["one"]
    assert [p["id"] for p in pairs] == ["three/0", "three/1", "three/2", "one/0"]
    for p in pairs:
        assert p["prompt"] == f"<prompt {p['problem_id']}>"
        assert p["chosen"].endswith("\\boxed{42}") and p["rejected"].endswith("\\boxed{41}")
    assert len({p["chosen"] for p in pairs[:3]}) == 3 and len({p["rejected"] for p in pairs[:3]}) == 3
    assert [passes_difficulty_filter(k, 7) for k in range(8)] == [False, True, True, True, False, False, False, False]


# ---- code verification ------------------------------------------------------------------------------------

def fenced(program):
    return f"Reasoning first.\n```python\n{program}\n```\n"


CORRECT = "a, b = map(int, input().split())\nprint(a + b)"


def test_code_rollouts_run_against_unit_tests():
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}]
    texts = [
        fenced(CORRECT),
        fenced("import sys\nprint(sum(map(int, sys.stdin.read().split())))"),
        fenced(CORRECT),
        fenced("a, b = map(int, input().split())\nprint(a * b)"),  # wrong on the first test
        fenced("print(5)"),  # right on the first test only
        fenced("raise SystemExit(input())"),  # crashes
        "```python\nwhile True:\n    pass\n```",  # runs out of time
        "I would print a + b.",  # no program
    ]
    code = record(texts, domain="code", record_id="sum")
    untested = record([fenced(CORRECT)] * 8, domain="code", record_id="untested")
    verified, stats = verify_rollouts([code, untested], {"sum": tests}, timeout=1.0, workers=2, use_tqdm=False)
    assert passed(verified[0]) == [True, True, True, False, False, False, False, False]
    assert [r["test_statuses"] for r in verified[0]["rollouts"]] == [
        ["ok", "ok"], ["ok", "ok"], ["ok", "ok"], ["wrong_answer"], ["ok", "wrong_answer"], ["runtime_error"],
        ["timeout"], []]
    assert verified[0]["tests"] == tests
    assert verified[1]["num_passed"] == 0  # no tests: nothing can pass
    assert stats == {"problems": 2, "rollouts": 16, "passed": 3, "code_problems_without_tests": 1,
                     "math_problems_without_reference": 0}
    pairs, pair_stats = build_pairs(verified)
    assert len(pairs) == 3 and pair_stats["dropped_none_solved"] == 1
    assert all(CORRECT in p["chosen"] or "sum(map" in p["chosen"] for p in pairs)


def test_unit_tests_that_the_teacher_contradicts_are_dropped():
    parsed = [{"input": "1 2", "output": "3"}, None, {"input": "1 2", "output": "3\n"},  # same test, kept once
              {"input": "5 5", "output": "10"}, {"input": "5 5", "output": "11"},  # contradiction: both dropped
              {"input": "0 0", "output": "0"}]
    assert consistent_tests(parsed) == [{"input": "1 2", "output": "3"}, {"input": "0 0", "output": "0"}]


# ---- input checks -----------------------------------------------------------------------------------------

def test_bad_records_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    good = record(["\\boxed{1}"])
    write_jsonl(path, [good, {**good, "id": "q", "rollouts": [{"text": "x", "finish_reason": "eos"}]}])
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2: rollouts\[0\]\.finish_reason"):
        read_rollouts(path)
    write_jsonl(path, [good, good])
    with pytest.raises(InputError, match=r":2: duplicate id 'p'"):
        read_rollouts(path)
    write_jsonl(path, [good])
    with pytest.raises(InputError, match=r":1: rollouts\[0\]\.passed"):
        read_rollouts(path, verified=True)

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"problem": "1+1?", "answer": 2}\n{"problem": "x", "domain": "chemistry"}\n')
    with pytest.raises(InputError, match=rf"{re.escape(str(problems))}:2: field 'domain'"):
        read_problems(problems)
    problems.write_text('{"problem": "1+1?", "answer": 2}\n{"problem": "f", "domain": "code"}\n')
    assert read_problems(problems) == [{"id": "problems/1", "problem": "1+1?", "answer": "2", "domain": "math"},
                                       {"id": "problems/2", "problem": "f", "answer": None, "domain": "code"}]


def test_cli_verify_and_pairs_need_no_model_for_math(tmp_path):
    rollouts, verified, pairs = tmp_path / "rollouts.jsonl", tmp_path / "verified.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(rollouts, [record(["\\boxed{4}"] * 2 + ["\\boxed{5}"] * 6, answer="4", record_id="a"),
                           record(["\\boxed{4}"] * 8, answer="2+2", record_id="b")])
    runner = CliRunner()
    result = runner.invoke(main, ["selfplay", "verify", "--input", str(rollouts), "--output", str(verified),
                                  "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 0, result.output
    assert [r["num_passed"] for r in read_jsonl(verified)] == [2, 8]
    result = runner.invoke(main, ["selfplay", "pairs", "--input", str(verified), "--output", str(pairs)])
    assert result.exit_code == 0, result.output
    assert [(p["chosen"], p["rejected"]) for p in read_jsonl(pairs)] == [("\\boxed{4}", "\\boxed{5}")] * 2
    assert "wrote 2 pairs from 1 of 2 problems" in result.output

    before = pairs.read_text()
    result = runner.invoke(main, ["selfplay", "pairs", "--input", str(rollouts), "--output", str(pairs)])
    assert result.exit_code == 2
    assert f"error: {rollouts}:1: rollouts[0].passed" in result.output
    assert pairs.read_text() == before  # a failed run leaves earlier output intact
    (tmp_path / "bad.jsonl").write_text(json.dumps(record(["x"])) + "\n{oops\n")
    result = runner.invoke(main, ["selfplay", "verify", "--input", str(tmp_path / "bad.jsonl"), "--output", str(verified)])
    assert result.exit_code == 2 and "bad.jsonl:2: invalid JSON" in result.output


# ---- through the engine -----------------------------------------------------------------------------------

BOXED_TOKENS = ["\\", "b", "o", "x", "e", "d", "{"]
CHAIN_LOGIT = 30.0


@pytest.fixture(scope="module")
def chain_model_dir(tmp_path_factory):
    """The bigram-chain checkpoint described in the module docstring."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    ids = {text: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) for text in BOXED_TOKENS + ["7", "8", "}", "."]}
    assert all(len(v) == 1 for v in ids.values())
    ids = {text: v[0] for text, v in ids.items()}
    generation_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                      tokenize=False)
    last_prompt_token = tokenizer.encode(generation_prompt, add_special_tokens=False)[-1]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [last_prompt_token] + [ids[t] for t in BOXED_TOKENS]
    edges = [(a, b, CHAIN_LOGIT) for a, b in zip(chain, chain[1:])]
    edges += [(ids["{"], ids["7"], CHAIN_LOGIT - math.log(3)), (ids["{"], ids["8"], CHAIN_LOGIT),
              (ids["7"], ids["}"], CHAIN_LOGIT), (ids["8"], ids["}"], CHAIN_LOGIT),
              (ids["}"], ids["."], CHAIN_LOGIT), (ids["."], eos, CHAIN_LOGIT)]
    predecessors = list(dict.fromkeys(a for a, _, _ in edges))
    hidden = 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
        embedding.zero_()
        head.zero_()
        for i, token in enumerate(predecessors):  # one axis per token, of RMS 1 so the final norm keeps it
            embedding[token, i] = math.sqrt(hidden)
        for a, b, logit in edges:
            head[b, predecessors.index(a)] = logit / math.sqrt(hidden)
    path = tmp_path_factory.mktemp("chain_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chain_llm(chain_model_dir):
    from promptcot_engine import LLM

    return LLM(chain_model_dir, **ENGINE)


def test_rollouts_verify_and_pairs_through_the_engine(chain_llm, chain_model_dir, tmp_path):
    from transformers import AutoTokenizer

    problems = [{"id": f"p{i}", "problem": f"What is {i} + {7 - i}?", "answer": "7", "domain": "math"}
                for i in range(8)]
    records = generate_rollouts(chain_llm, problems, n=8, max_tokens=32, seed=3, use_tqdm=False)
    hf_tokenizer = AutoTokenizer.from_pretrained(chain_model_dir)
    for problem, rec in zip(problems, records):
        messages = [{"role": "user", "content": solution_request(problem["problem"], "math")}]
        assert rec["prompt"] == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert problem["problem"] in rec["prompt"] and "\\boxed{}" in rec["prompt"]
        assert len(rec["rollouts"]) == 8 and all(
            r["text"] in ("\\boxed{7}.", "\\boxed{8}.") and r["finish_reason"] == "stop" and r["num_tokens"] == 11
            for r in rec["rollouts"])
    assert generate_rollouts(chain_llm, problems, n=8, max_tokens=32, seed=3, use_tqdm=False) == records

    verified, _ = verify_rollouts(records, {}, use_tqdm=False)
    pairs, stats = build_pairs(verified)
    sevens = [sum(r["text"] == "\\boxed{7}." for r in rec["rollouts"]) for rec in records]
    assert [v["num_passed"] for v in verified] == sevens
    assert stats["pairs"] == sum(min(k, 8 - k) for k in sevens if 0 < k < 4) == len(pairs)
    assert stats["kept"] == sum(1 for k in sevens if 0 < k < 4) > 0
    assert all(p["chosen"] == "\\boxed{7}." and p["rejected"] == "\\boxed{8}." for p in pairs)


def test_sft_data_keeps_traces_with_a_final_answer_within_the_limit(chain_llm):
    problems = [{"id": "m", "problem": "What is 3 + 4?", "answer": None, "domain": "math"},
                {"id": "c", "problem": "Print 7.", "answer": None, "domain": "code"}]
    records, stats = build_sft_data(chain_llm, problems, max_trace_tokens=64, use_tqdm=False)
    assert stats == {"problems": 2, "kept": 1, "dropped": {"too_long": 0, "no_final_answer": 1}}
    assert records == [{"id": "m", "domain": "math", "prompt": solution_request("What is 3 + 4?", "math"),
                        "completion": records[0]["completion"]}]
    assert records[0]["completion"] in ("\\boxed{7}.", "\\boxed{8}.")
    # the trace is 11 tokens with EOS: a limit of 10 cuts it
    _, stats = build_sft_data(chain_llm, problems, max_trace_tokens=10, use_tqdm=False)
    assert stats["dropped"] == {"too_long": 2, "no_final_answer": 0}
    records, _ = build_sft_data(chain_llm, problems, max_trace_tokens=11, use_tqdm=False)
    assert len(records) == 1


def test_cli_pipeline_and_sft_data(chain_model_dir, tmp_path):
    from transformers import AutoTokenizer

    problems = tmp_path / "problems.jsonl"
    write_jsonl(problems, [{"id": f"q{i}", "problem": f"Compute {i} + {7 - i}.", "answer": "7"} for i in range(4)]
                + [{"id": "open", "problem": "Name a number."}])
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("rollouts", "verified", "pairs", "sft")}
    runner = CliRunner()
    model = ["--model", str(chain_model_dir), *CLI_ENGINE]
    result = runner.invoke(main, ["selfplay", "rollouts", *model, "--input", str(problems), "--output",
                                  str(paths["rollouts"]), "--max-tokens", "32", "--seed", "11"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["selfplay", "verify", *model, "--input", str(paths["rollouts"]), "--output",
                                  str(paths["verified"])])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["selfplay", "pairs", *model, "--ref-logprobs", "--input", str(paths["verified"]),
                                  "--output", str(paths["pairs"])])
    assert result.exit_code == 0, result.output
    verified = read_jsonl(paths["verified"])
    assert verified[-1]["reference_source"] == "majority_vote" and verified[-1]["reference"] == "8"
    expected = sum(min(v["num_passed"], 8 - v["num_passed"]) for v in verified if 0 < v["num_passed"] < 4)
    pairs = read_jsonl(paths["pairs"])
    assert len(pairs) == expected
    # every chain token but the 7-or-8 choice has probability ~1, and the trainer's tokens are the chain's
    for p in pairs:
        assert (p["chosen"], p["rejected"]) == ("\\boxed{7}.", "\\boxed{8}.")
        assert p["ref_chosen_logprob"] == pytest.approx(math.log(1 / 4), abs=1e-4)
        assert p["ref_rejected_logprob"] == pytest.approx(math.log(3 / 4), abs=1e-4)

    result = runner.invoke(main, ["sft-data", *model, "--input", str(problems), "--output", str(paths["sft"]),
                                  "--max-trace-tokens", "32", "--student", str(chain_model_dir)])
    assert result.exit_code == 0, result.output
    assert "wrote 5 of 5 traces" in result.output
    hf_tokenizer = AutoTokenizer.from_pretrained(chain_model_dir)
    for row, problem in zip(read_jsonl(paths["sft"]), read_jsonl(problems)):
        messages = [{"role": "user", "content": solution_request(problem["problem"], "math")}]
        assert row["prompt"] == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    result = runner.invoke(main, ["sft-data", *model, "--input", str(tmp_path / "missing.jsonl"), "--output",
                                  str(paths["sft"])])
    assert result.exit_code == 2 and "missing.jsonl: no such file" in result.output


def test_reference_logprobs_match_transformers(tiny_llama_dir):
    from transformers import AutoTokenizer

    from promptcot_engine import LLM

    llm = LLM(tiny_llama_dir, **ENGINE)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": solution_request("Find x if 2x = 4.", "math")}])
    other = llm.tokenizer.apply_chat_template([{"role": "user", "content": solution_request("Print 1.", "code")}])
    pairs = [{"prompt": prompt, "chosen": "2x = 4, so x = \\boxed{2}", "rejected": "x = \\boxed{3}"},
             {"prompt": prompt, "chosen": "Divide by two: \\boxed{2}.", "rejected": "\\boxed{8}"},
             {"prompt": other, "chosen": "```python\nprint(1)\n```", "rejected": "```python\nprint(2)\n```"}]
    scored = add_reference_logprobs(llm, pairs, use_tqdm=False)

    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = hf_model(tiny_llama_dir)

    def reference(prompt_text, completion):
        prompt_ids = hf_tokenizer(prompt_text)["input_ids"]
        completion_ids = hf_tokenizer(completion, add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].double()
        logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        return logprobs.gather(1, torch.tensor(completion_ids)[:, None]).sum().item()

    for pair, result in zip(pairs, scored):
        assert {k: result[k] for k in pair} == pair
        assert result["ref_chosen_logprob"] == pytest.approx(reference(pair["prompt"], pair["chosen"]), abs=1e-3)
        assert result["ref_rejected_logprob"] == pytest.approx(reference(pair["prompt"], pair["rejected"]), abs=1e-3)
