"""Training records -> token ids with loss masks.

SFT records are {"prompt", "completion"} or chat {"messages": [{"role", "content"}, ...]}; DPO records are
{"prompt", "chosen", "rejected"} with optional precomputed "ref_chosen_logprob" / "ref_rejected_logprob".
A completion (and chosen / rejected) is a string or a list of string segments. The prompt is tokenized
with the tokenizer's special tokens, each completion segment without them, and the ids are concatenated
with EOS appended: the same way the engine's scorer tokenizes a context and its continuation segments, so
the tokens trained on are the tokens scored (`completion_token_ids` gives them to the scorer's callers).

Labels follow transformers: a token's own id where it is a target, IGNORE_INDEX elsewhere, unshifted.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import iter_jsonl, require_fields
from promptcot_engine.kernels.fused_linear_cross_entropy import IGNORE_INDEX
from promptcot_engine.models.tokenizer import Tokenizer

REF_FIELDS = ("ref_chosen_logprob", "ref_rejected_logprob")


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]
    source: str  # "file:line" or "examples[i]", for error messages

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(self.input_ids, self.labels)]

    @property
    def num_targets(self) -> int:
        return _num_targets(self.labels)


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen_logprob: float | None
    ref_rejected_logprob: float | None
    source: str

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(prompt + chosen) then (prompt + rejected), the loss on the completion tokens only."""
        masked_prompt = [IGNORE_INDEX] * len(self.prompt_ids)
        return [(self.prompt_ids + completion, masked_prompt + completion)
                for completion in (self.chosen_ids, self.rejected_ids)]

    @property
    def num_targets(self) -> int:
        return sum(_num_targets(labels) for _, labels in self.sequences())


@dataclass
class DataStats:
    """What became of the records; examples longer than max_length are counted, never dropped silently."""
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    first_skipped: str | None = None

    def to_dict(self) -> dict:
        return {"records": self.records, "examples": self.examples, "truncated": self.truncated,
                "skipped_too_long": self.skipped_too_long}


def read_records(data: str | os.PathLike | Iterable[dict]) -> list[tuple[str, dict]]:
    """(source, record) pairs from a JSONL path or from in-memory dicts."""
    if isinstance(data, (str, os.PathLike)):
        return [(f"{data}:{line}", record) for line, record in iter_jsonl(data)]
    records = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise InputError(f"examples[{i}]: expected a dict, got {type(record).__name__}")
        records.append((f"examples[{i}]", record))
    return records


def completion_token_ids(tokenizer: Tokenizer, completion: str | list[str]) -> list[int]:
    """The ids a completion is trained (and should be scored) as: each segment tokenized on its own,
    without special tokens, concatenated, then EOS."""
    segments = [completion] if isinstance(completion, str) else completion
    ids = [i for segment in segments for i in tokenizer.encode(segment, add_special_tokens=False)]
    return ids + [_eos_id(tokenizer)]


def tokenize_sft(records: list[tuple[str, dict]], tokenizer: Tokenizer, max_length: int,
                 truncation: str) -> tuple[list[SFTExample], DataStats]:
    stats = DataStats(records=len(records))
    examples = []
    for source, record in records:
        if "messages" in record:
            input_ids, labels = _chat_ids(tokenizer, record["messages"], source)
        else:
            require_fields(record, ("prompt", "completion"), source)
            prompt = _text(record, "prompt", source, segments=False)
            prompt_ids = tokenizer.encode_prompt(prompt)
            completion_ids = completion_token_ids(tokenizer, _text(record, "completion", source))
            input_ids, labels = prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if truncation == "skip" or not _num_targets(labels):
                _count_skip(stats, source)
                continue
            stats.truncated += 1
        if not _num_targets(labels):
            raise InputError(f"{source}: nothing to train on (no target token follows a first token)")
        examples.append(SFTExample(input_ids, labels, source))
    stats.examples = len(examples)
    return examples, stats


def tokenize_preferences(records: list[tuple[str, dict]], tokenizer: Tokenizer, max_length: int,
                         truncation: str) -> tuple[list[PreferenceExample], DataStats]:
    """Too long pairs are truncated at the end of both completions; a pair whose reference log-probs came
    with the record is skipped instead, since they were computed on the untruncated completions."""
    stats = DataStats(records=len(records))
    examples = []
    for source, record in records:
        require_fields(record, ("prompt", "chosen", "rejected"), source)
        prompt_ids = tokenizer.encode_prompt(_text(record, "prompt", source, segments=False))
        chosen = completion_token_ids(tokenizer, _text(record, "chosen", source))
        rejected = completion_token_ids(tokenizer, _text(record, "rejected", source))
        refs = _reference_logprobs(record, source)
        room = max_length - len(prompt_ids)
        if room < max(len(chosen), len(rejected)):
            if truncation == "skip" or refs is not None or room < 1 or (room == 1 and not prompt_ids):
                _count_skip(stats, source)
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            stats.truncated += 1
        ref_chosen, ref_rejected = refs if refs is not None else (None, None)
        examples.append(PreferenceExample(prompt_ids, chosen, rejected, ref_chosen, ref_rejected, source))
    stats.examples = len(examples)
    return examples, stats


def _num_targets(labels: list[int]) -> int:
    """Targets that are predicted: a sequence's first token has no context, so it never is one."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def _count_skip(stats: DataStats, source: str) -> None:
    stats.skipped_too_long += 1
    stats.first_skipped = stats.first_skipped or source


def _eos_id(tokenizer: Tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos_token: completions cannot be terminated")
    return eos


def _text(record: dict, field: str, source: str, segments: bool = True) -> str | list[str]:
    value = record[field]
    if isinstance(value, str):
        return value
    if segments and isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        return value
    kind = "a string or a non-empty list of strings" if segments else "a string"
    raise InputError(f"{source}: field {field!r} must be {kind}, got {type(value).__name__}")


def _reference_logprobs(record: dict, source: str) -> tuple[float, float] | None:
    present = [f for f in REF_FIELDS if f in record]
    if not present:
        return None
    if len(present) == 1:
        missing = next(f for f in REF_FIELDS if f not in record)
        raise InputError(f"{source}: {present[0]!r} given without {missing!r}")
    values = []
    for field in REF_FIELDS:
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{source}: field {field!r} must be a finite number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def _chat_ids(tokenizer: Tokenizer, messages, source: str) -> tuple[list[int], list[int]]:
    """The conversation rendered with the chat template; targets are the tokens of the assistant turns
    (their content and the template's end-of-turn text), found by rendering the conversation turn by turn."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{source}: field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise InputError(f"{source}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{source}: 'messages' has no assistant turn to train on")
    text = tokenizer.render_chat(messages, source, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], source, True)
        through = tokenizer.render_chat(messages[: i + 1], source, False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise InputError(f"{source}: the chat template does not render messages[{i}] as a prefix of the "
                             "whole conversation, so its assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    labels = [token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
              for token, (offset, _) in zip(encoding.ids, encoding.offsets)]
    return list(encoding.ids), labels


