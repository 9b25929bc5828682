"""The Python side of the C API: csrc/promptcot_engine.c passes the caller's JSON bytes to these functions and
hands their JSON text back. Anything wrong with the input raises InputError naming the field and index."""
from __future__ import annotations

import dataclasses
import json
import os
import traceback
import types
import typing

from promptcot_engine.config import EngineConfig
from promptcot_engine.errors import InputError
from promptcot_engine.sampling_params import SamplingParams

Prompt = str | list[int]
Segment = str | list[int]


def create(model: bytes, options_json: bytes):
    from promptcot_engine.engine.llm import LLM

    options = _parse(options_json, "options_json") if options_json.strip() else {}
    hints = _init_fields(EngineConfig)
    hints.pop("model")
    return LLM(os.fsdecode(model), **_check_object(options, hints, "options_json"))


def generate(llm, requests_json: bytes) -> str:
    request = _parse(requests_json, "requests_json")
    fields = {"prompts": list[Prompt], "sampling_params": dict | list[dict] | None}
    request = _check_object(request, fields, "requests_json", required=("prompts",))
    params = request.get("sampling_params")
    if isinstance(params, list):
        params = [_sampling_params(p, f"requests_json.sampling_params[{i}]") for i, p in enumerate(params)]
    else:
        params = _sampling_params(params or {}, "requests_json.sampling_params")
    outputs = llm.generate(request["prompts"], params, use_tqdm=False)
    return _dumps([dataclasses.asdict(o) for o in outputs])


def score(llm, pairs_json: bytes) -> str:
    pairs = _parse(pairs_json, "pairs_json")
    _check(pairs, list[dict], "pairs_json")
    fields = {"context": Segment, "continuation": Segment | list[Segment]}
    pairs = [_check_object(p, fields, f"pairs_json[{i}]", required=tuple(fields)) for i, p in enumerate(pairs)]
    outputs = llm.score([p["context"] for p in pairs], [p["continuation"] for p in pairs], use_tqdm=False)
    return _dumps([dataclasses.asdict(o) for o in outputs])


def error_message(error: BaseException) -> str:
    """What a C caller reads: the message of bad input, the whole traceback of anything else."""
    if isinstance(error, InputError):
        return str(error)
    return "".join(traceback.format_exception(error)).rstrip()


def _sampling_params(fields, where: str) -> SamplingParams:
    return SamplingParams(**_check_object(fields, _init_fields(SamplingParams), where))


def _init_fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _parse(text: bytes, where: str):
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON: {e}") from None


def _reject_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _check_object(value, fields: dict[str, object], where: str, required: tuple[str, ...] = ()) -> dict:
    _check(value, dict, where)
    for name in value:
        if name not in fields:
            raise InputError(f"{where}: unknown field {name!r} (known: {', '.join(fields)})")
    for name in required:
        if name not in value:
            raise InputError(f"{where}: missing field {name!r}")
    for name, item in value.items():
        _check(item, fields[name], f"{where}.{name}")
    return value


def _check(value, hint, where: str) -> None:
    if not _matches(value, hint):
        raise InputError(f"{where}: expected {_describe(hint)}, got {_dumps(value)[:80]}")


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON true/false are not numbers, though Python's bool is an int
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint in (str, dict):
        return isinstance(value, hint)
    raise TypeError(f"no JSON check for {hint!r}")


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is list:
        return f"a list of ({_describe(typing.get_args(hint)[0])})"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "an object"}[hint]
