"""`promptcot generate` and `promptcot score`: JSONL in, JSONL out, checked against transformers (its tokenizer,
greedy generate and log_softmax), and their errors naming the file and line."""
import json

import pytest
import torch
from click.testing import CliRunner

from promptcot_engine.cli import main
from tests.jsonl_lines import write_jsonl_lines
from tests.reference import hf_model, hf_token_logprobs

CONTEXT_TOO_LONG = "word " * 3000  # far past the tiny checkpoints' 2048 positions


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from transformers import AutoTokenizer

    return hf_model(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def reference_logprobs(model, prompt_ids, output_ids) -> list[float]:
    return hf_token_logprobs(model, prompt_ids, output_ids)[0].tolist()


def test_generate_greedy_matches_transformers(tiny_llama_dir, hf, tmp_path):
    model, tokenizer = hf
    messages = [{"role": "user", "content": "name three primes"}]
    source = write_jsonl_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the sum of two odd numbers"}, "",
                                                 {"id": "b", "messages": messages}])
    out = tmp_path / "out.jsonl"
    result = run("generate", "--model", tiny_llama_dir, "--device", "cpu", "--dtype", "float32", "--input", source,
                 "--prompt", "an inline prompt", "--output", out, "--temperature", 0, "--max-tokens", 12, "--logprobs")
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert [r["id"] for r in records] == ["a", "b", "prompt0"]
    prompts = [tokenizer("the sum of two odd numbers").input_ids,
               tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"],
               tokenizer("an inline prompt").input_ids]
    for record, prompt_ids in zip(records, prompts):
        (completion,) = record["outputs"]
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        expected = expected[0, len(prompt_ids):].tolist()
        stopped = expected[-1] == tokenizer.eos_token_id
        assert completion["token_ids"] == expected
        assert completion["finish_reason"] == ("stop" if stopped else "length")
        assert completion["text"] == tokenizer.decode(completion["token_ids"], skip_special_tokens=True)
        reference = reference_logprobs(model, prompt_ids, completion["token_ids"])
        assert max(abs(a - b) for a, b in zip(completion["logprobs"], reference)) <= 1e-4
    assert records[1]["prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_generate_seeds_each_record_from_its_id(tiny_llama_dir, hf, tmp_path):
    """With --seed, a record draws the same tokens whatever else is in the file, and two records with the same
    prompt still draw different ones (each has its own stream)."""
    model, tokenizer = hf
    same = "once upon a time"
    records = [{"id": "a", "prompt": same}, {"id": "b", "prompt": same}, {"id": "c", "prompt": "far away"}]
    options = ["--model", tiny_llama_dir, "--device", "cpu", "--dtype", "float32", "--n", 2, "--max-tokens", 6,
               "--ignore-eos", "--seed", 7, "--logprobs"]
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert run("generate", *options, "--input", write_jsonl_lines(tmp_path / "all.jsonl", records),
               "--output", first).exit_code == 0
    assert run("generate", *options, "--input", write_jsonl_lines(tmp_path / "some.jsonl", records[:0:-1]),
               "--output", second).exit_code == 0
    by_id = {r["id"]: r["outputs"] for r in read_records(first)}
    assert {r["id"]: r["outputs"] for r in read_records(second)} == {"b": by_id["b"], "c": by_id["c"]}
    assert [c["token_ids"] for c in by_id["a"]] != [c["token_ids"] for c in by_id["b"]]
    for outputs, prompt in ((by_id["a"], same), (by_id["c"], "far away")):  # sampled tokens' log-probs, unmodified
        for completion in outputs:
            reference = reference_logprobs(model, tokenizer(prompt).input_ids, completion["token_ids"])
            assert max(abs(a - b) for a, b in zip(completion["logprobs"], reference)) <= 1e-4


def test_score_matches_transformers(tiny_llama_dir, hf, tmp_path):
    model, tokenizer = hf
    pairs = [{"id": 7, "context": "Concepts: parity.", "continuation": " Rationale: odd plus odd. Problem: why even?"},
             {"context": "Concepts: parity.", "continuation": [" Rationale: odd plus odd.", " Problem: why even?"]}]
    out = tmp_path / "scores.jsonl"
    result = run("score", "--model", tiny_llama_dir, "--device", "cpu", "--dtype", "float32",
                 "--input", write_jsonl_lines(tmp_path / "pairs.jsonl", pairs), "--output", out, "--token-logprobs")
    assert result.exit_code == 0, result.output
    whole, segmented = read_records(out)
    assert (whole["id"], segmented["id"]) == (7, 2)  # a record without an id is named by its line
    context = tokenizer(pairs[0]["context"]).input_ids
    for record, segments in ((whole, [pairs[0]["continuation"]]), (segmented, pairs[1]["continuation"])):
        segment_ids = [tokenizer(s, add_special_tokens=False).input_ids for s in segments]
        continuation = [t for ids in segment_ids for t in ids]
        reference, greedy = hf_token_logprobs(model, context, continuation)
        reference = reference.tolist()
        assert record["num_tokens"] == len(continuation)
        assert max(abs(a - b) for a, b in zip(record["token_logprobs"], reference)) <= 1e-4
        assert record["logprob_sum"] == pytest.approx(sum(reference), abs=1e-3)
        assert record["is_greedy"] == greedy
    first_segment = len(tokenizer(pairs[1]["continuation"][0], add_special_tokens=False).input_ids)
    bounds = [0, first_segment, segmented["num_tokens"]]
    assert segmented["segment_logprob_sums"] == pytest.approx(
        [sum(segmented["token_logprobs"][a:b]) for a, b in zip(bounds, bounds[1:])], abs=1e-4)
    assert "segment_logprob_sums" not in whole


@pytest.mark.parametrize("command,records,message", [
    ("generate", [{"prompt": "a"}, {"prompt": 3}], ":2: needs a string field 'prompt' or a list field 'messages'"),
    ("generate", [{"prompt": "a"}, "{broken"], ":2: invalid JSON"),
    ("generate", [{"messages": [{"role": "user"}]}], ":1: field 'messages' must be a list of {role, content} objects"),
    ("generate", [{"prompt": "a"}, "", {"prompt": CONTEXT_TOO_LONG}], ":3: prompt 1 has 12000 tokens: longer than"),
    ("score", [{"context": "a", "continuation": "b"}, {"context": "a", "continuation": ""}],
     ":2: pair 1: empty continuation"),
    ("score", [{"context": CONTEXT_TOO_LONG, "continuation": "b"}], ":1: pair 0 has 12001 tokens: longer than"),
    ("score", [{"context": 1, "continuation": "b"}], ":1: needs a string field 'context'"),
    ("score", [{"context": "a", "continuation": ["b", 2]}], ":1: 'continuation' must be a string or a list of strings"),
])
def test_bad_input_names_file_and_line_and_keeps_the_output(tiny_llama_dir, tmp_path, command, records, message):
    source, out = write_jsonl_lines(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    result = run(command, "--model", tiny_llama_dir, "--device", "cpu", "--input", source, "--output", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {source}{message}") and result.stderr.count("\n") == 1
    assert out.read_text() == "previous output\n"


@pytest.mark.parametrize("option,message", [
    (["--n", 0], "SamplingParams.n must be"),
    (["--top-p", 0], "SamplingParams.top_p must be"),
    (["--temperature", -1], "SamplingParams.temperature must be"),
    (["--max-tokens", 0], "SamplingParams.max_tokens must be"),
])
def test_bad_sampling_option_is_a_user_error(tiny_llama_dir, option, message):
    result = run("generate", "--model", tiny_llama_dir, "--device", "cpu", "--prompt", "a", *option)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}")
