"""Training data: masks, EOS, completion segments, chat turns, truncation counts, packing, bad records."""
import json

import pytest
import torch

from promptcot_engine.errors import InputError
from promptcot_engine.kernels.fused_linear_cross_entropy import IGNORE_INDEX
from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.train.data import completion_token_ids, read_records, tokenize_preferences, tokenize_sft
from promptcot_engine.train.packing import pack
from promptcot_engine.train.sampler import micro_batches, step_indices


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return Tokenizer.from_dir(tiny_llama_dir)


def sft(records, tokenizer, max_length=512, truncation="truncate"):
    return tokenize_sft(read_records(records), tokenizer, max_length, truncation)


def test_prompt_masked_completion_trained_with_eos(tokenizer):
    (example,), stats = sft([{"prompt": "Find the number", "completion": " of positive integers"}], tokenizer)
    prompt_ids = tokenizer.encode("Find the number")
    completion_ids = tokenizer.encode(" of positive integers", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert example.input_ids == prompt_ids + completion_ids + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos]
    assert example.num_targets == len(completion_ids) + 1
    assert stats.to_dict() == {"records": 1, "examples": 1, "truncated": 0, "skipped_too_long": 0}


def test_completion_segments_are_tokenized_separately(tokenizer):
    """As the scorer tokenizes continuation segments: ids of each segment, concatenated (not the ids of
    the joined string, which can merge across the boundary)."""
    segments = ["Let x be a rea", "l number"]
    separate = [i for s in segments for i in tokenizer.encode(s, add_special_tokens=False)]
    assert separate != tokenizer.encode("".join(segments), add_special_tokens=False)  # the case worth testing
    (example,), _ = sft([{"prompt": "Q", "completion": segments}], tokenizer)
    assert example.input_ids[len(tokenizer.encode("Q")):] == separate + [tokenizer.eos_token_id]
    assert completion_token_ids(tokenizer, segments) == separate + [tokenizer.eos_token_id]


def test_chat_messages_train_on_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute the area"},
                {"role": "assistant", "content": "84"}, {"role": "user", "content": "and r?"},
                {"role": "assistant", "content": "4"}]
    (example,), _ = sft([{"messages": messages}], tokenizer)
    assert example.input_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    targets = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    # each assistant turn's content and its end-of-turn marker, nothing of the system or user turns
    assert targets == "84<|im_end|>\n4<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))


def test_too_long_examples_are_truncated_or_skipped_and_counted(tokenizer):
    records = [{"prompt": "Q", "completion": "short"},
               {"prompt": "Q", "completion": "The quick brown fox jumps over the lazy dog. " * 4},
               {"prompt": "In triangle ABC, AB = 13, BC = 14 and CA = 15. " * 4, "completion": "x"}]
    examples, stats = sft(records, tokenizer, max_length=20, truncation="truncate")
    assert stats.to_dict() == {"records": 3, "examples": 2, "truncated": 1, "skipped_too_long": 1}
    assert [len(e.input_ids) for e in examples][1] == 20 and examples[1].labels[-1] != IGNORE_INDEX
    assert stats.first_skipped == "examples[2]"  # its prompt alone fills max_length: nothing left to learn
    examples, stats = sft(records, tokenizer, max_length=20, truncation="skip")
    assert stats.to_dict() == {"records": 3, "examples": 1, "truncated": 0, "skipped_too_long": 2}


def test_preference_pairs_and_reference_fields(tokenizer):
    records = [{"prompt": "Q: 2+2?", "chosen": "4", "rejected": ["fi", "ve"]},
               {"prompt": "Q", "chosen": "a", "rejected": "b", "ref_chosen_logprob": -1.5, "ref_rejected_logprob": -2}]
    examples, stats = tokenize_preferences(read_records(records), tokenizer, 64, "truncate")
    first, second = examples
    assert first.prompt_ids == tokenizer.encode("Q: 2+2?")
    assert first.rejected_ids == completion_token_ids(tokenizer, ["fi", "ve"])
    (chosen_ids, chosen_labels), _ = first.sequences()
    assert chosen_ids == first.prompt_ids + first.chosen_ids
    assert chosen_labels == [IGNORE_INDEX] * len(first.prompt_ids) + first.chosen_ids
    assert (first.ref_chosen_logprob, second.ref_chosen_logprob, second.ref_rejected_logprob) == (None, -1.5, -2.0)
    # a pair too long to keep whole: truncated, unless its reference log-probs were computed on the whole one
    long = "The quick brown fox jumps over the lazy dog. " * 3
    records = [{"prompt": "Q", "chosen": long, "rejected": "b"},
               {"prompt": "Q", "chosen": long, "rejected": "b", "ref_chosen_logprob": -1, "ref_rejected_logprob": -2}]
    examples, stats = tokenize_preferences(read_records(records), tokenizer, 16, "truncate")
    assert stats.to_dict() == {"records": 2, "examples": 1, "truncated": 1, "skipped_too_long": 1}
    assert len(examples[0].prompt_ids + examples[0].chosen_ids) == 16


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', "data.jsonl:2: expected a JSON object"),
    ('{"prompt": "Q"}', "data.jsonl:2: missing field 'completion'"),
    ('{"prompt": "Q", "completion": 7}', "data.jsonl:2: field 'completion' must be a string or a non-empty list"),
    ('{"prompt": ["Q"], "completion": "a"}', "data.jsonl:2: field 'prompt' must be a string"),
    ('{"messages": [{"role": "user"}]}', "data.jsonl:2: messages[0] must be an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "data.jsonl:2: 'messages' has no assistant turn"),
    ('{"prompt": "Q", "completion": "a", "chosen": 1', "data.jsonl:2: invalid JSON"),
])
def test_bad_sft_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": "a"}) + "\n" + line + "\n")
    with pytest.raises(InputError) as error:
        sft(path, tokenizer)
    assert message in str(error.value).replace(str(tmp_path) + "/", "")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "ref_chosen_logprob": -1.0}, "given without 'ref_rejected_logprob'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "ref_chosen_logprob": "x", "ref_rejected_logprob": -1},
     "'ref_chosen_logprob' must be a finite number"),
])
def test_bad_preference_records_name_their_index(tokenizer, record, message):
    with pytest.raises(InputError, match=rf"examples\[1\]: .*{message}"):
        tokenize_preferences(read_records([{"prompt": "Q", "chosen": "a", "rejected": "b"}, record]), tokenizer, 64, "skip")


def test_packing_shifts_targets_inside_each_sequence():
    batch = pack([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [8, 9]), ([4], [4])])
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 4]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1, 0]
    # 7 never learns to predict 8, the next sequence's first token; a lone token predicts nothing
    assert batch.targets.tolist() == [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.sequence_index().tolist() == [0, 0, 0, 1, 1, 2]


def test_every_example_once_per_epoch_and_ranks_share_each_step():
    n, batch_size, seed = 23, 5, 3
    steps = -(-n // batch_size)
    for epoch in range(2):
        seen = [i for s in range(steps) for i in step_indices(n, batch_size, seed, epoch * steps + s)]
        assert sorted(seen) == list(range(n))
    assert step_indices(n, batch_size, seed, 0) != step_indices(n, batch_size, seed, steps)  # reshuffled
    indices = step_indices(n, batch_size, seed, 1)
    shares = [micro_batches(indices, rank, 2, 2) for rank in range(2)]
    assert sorted(i for share in shares for part in share for i in part) == sorted(indices)
    assert all(len(share) == 2 for share in shares)
