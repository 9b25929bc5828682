"""CLI: promptcot generate, promptcot score (JSONL in, JSONL out)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click

from promptcot_engine.errors import InputError
from promptcot_engine.jsonl import iter_jsonl, write_jsonl


def engine_options(f):
    """--model, --dtype, --device, --max-num-seqs, --kv-cache-gb: shared by every command that runs the engine."""
    for decorator in reversed([
        click.option("--model", default="smollm2-135m-instruct", show_default=True,
                     help="HF checkpoint directory, .gguf file, or packaged model name."),
        click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--max-num-seqs", default=256, show_default=True, help="Sequences decoded together."),
        click.option("--kv-cache-gb", type=float, default=None, help="KV cache budget (default: profiled on GPU; 2 GiB on CPU)."),
    ]):
        f = decorator(f)
    return f


def make_llm(model: str, dtype: str, device: str, max_num_seqs: int, kv_cache_gb: float | None, seed: int = 0):
    from promptcot_engine.engine.llm import LLM

    return LLM(model, dtype=dtype, device=device, seed=seed, max_num_seqs=max_num_seqs, kv_cache_memory_gb=kv_cache_gb)


def _read_prompts(path: Path, chat: bool, tokenizer) -> tuple[list[str], list[str | list[int]], list[str], list[int]]:
    """(ids, prompts, prompt texts, line numbers) of a JSONL file of {'prompt'} or {'messages'} records. A chat
    prompt is given as its ids, tokenized as transformers tokenizes a chat (`Tokenizer.chat_prompt`)."""
    ids, prompts, texts, lines = [], [], [], []
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise InputError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
            text, prompt = tokenizer.chat_prompt(messages, where)
        elif isinstance(record.get("prompt"), str):
            text = prompt = record["prompt"]
            if chat:
                text, prompt = tokenizer.chat_prompt([{"role": "user", "content": text}], where)
        else:
            raise InputError(f"{where}: needs a string field 'prompt' or a list field 'messages'")
        ids.append(str(record.get("id", line)))
        prompts.append(prompt)
        texts.append(text)
        lines.append(line)
    return ids, prompts, texts, lines


@contextmanager
def naming_lines(path: Path | None, lines: list[int]):
    """Name the file and line of a prompt or pair the engine refuses (it knows only the index in its batch)."""
    try:
        yield
    except InputError as e:
        if path is None or e.item is None or e.item >= len(lines):
            raise
        raise InputError(f"{path}:{lines[e.item]}: {e}", e.item) from None


@click.command()
@engine_options
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="JSONL with 'prompt' or 'messages'.")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt given inline (repeatable).")
@click.option("--output", type=click.Path(path_type=Path), help="JSONL to write (default: print the texts).")
@click.option("--chat", is_flag=True, help="Wrap plain prompts in the model's chat template as a user turn.")
@click.option("--n", default=1, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=-1, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--min-tokens", default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--logprobs", is_flag=True, help="Also write the log-prob of each sampled token.")
@click.option("--seed", type=int, default=None,
              help="Base seed: each record samples with a seed derived from it and the record's id, so that a "
                   "record draws the same tokens whatever else is in the file, and records with different ids never "
                   "share draws.")
def generate(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, prompt_texts, output, chat, n, temperature,
             top_p, top_k, min_p, max_tokens, min_tokens, stop, stop_token_ids, ignore_eos, logprobs, seed):
    """Generate completions for prompts from --input (JSONL) or --prompt."""
    from promptcot_engine.engine.random_streams import record_seed
    from promptcot_engine.sampling_params import SamplingParams

    if not input_path and not prompt_texts:
        raise InputError("give --input FILE.jsonl or at least one --prompt")
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens,
                            min_tokens=min_tokens, stop=list(stop), stop_token_ids=list(stop_token_ids),
                            ignore_eos=ignore_eos, logprobs=logprobs)
    llm = make_llm(model, dtype, device, max_num_seqs, kv_cache_gb)
    ids, prompts, texts, lines = _read_prompts(input_path, chat, llm.tokenizer) if input_path else ([], [], [], [])
    for i, text in enumerate(prompt_texts):
        prompt = text
        if chat:
            text, prompt = llm.tokenizer.chat_prompt([{"role": "user", "content": text}], f"--prompt {i + 1}")
        ids.append(f"prompt{i}")
        texts.append(text)
        prompts.append(prompt)
    per_record = params if seed is None else [replace(params, seed=record_seed(seed, i)) for i in ids]
    with naming_lines(input_path, lines):
        outputs = llm.generate(prompts, per_record)
    if output:
        write_jsonl(output, ({"id": i, "prompt": text, "outputs": [_completion_record(c) for c in o.outputs]}
                             for i, text, o in zip(ids, texts, outputs)))
        click.echo(f"wrote {len(outputs)} records to {output}", err=True)
        return
    for o in outputs:
        for c in o.outputs:
            click.echo(c.text)


def _completion_record(c) -> dict:
    record = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        record["logprobs"] = c.logprobs
    return record


@click.command()
@engine_options
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="JSONL with 'context' and 'continuation' (a string or a list of segment strings).")
@click.option("--output", required=True, type=click.Path(path_type=Path))
@click.option("--token-logprobs/--no-token-logprobs", default=False, help="Also write every token's log-prob.")
def score(model, dtype, device, max_num_seqs, kv_cache_gb, input_path, output, token_logprobs):
    """Teacher-forced log-likelihood of each continuation given its context."""
    ids, contexts, continuations, lines = [], [], [], []
    for line, record in iter_jsonl(input_path):
        context, continuation = record.get("context"), record.get("continuation")
        if not isinstance(context, str):
            raise InputError(f"{input_path}:{line}: needs a string field 'context'")
        if not (isinstance(continuation, str) or (isinstance(continuation, list) and continuation
                                                   and all(isinstance(s, str) for s in continuation))):
            raise InputError(f"{input_path}:{line}: 'continuation' must be a string or a list of strings")
        ids.append(record.get("id", line))
        contexts.append(context)
        continuations.append(continuation)
        lines.append(line)
    llm = make_llm(model, dtype, device, max_num_seqs, kv_cache_gb)
    with naming_lines(input_path, lines):
        results = llm.score(contexts, continuations)
    records = []
    for i, r in zip(ids, results):
        record = {"id": i, "logprob_sum": r.logprob_sum, "num_tokens": len(r.token_ids), "is_greedy": r.is_greedy}
        if r.segment_logprob_sums is not None:
            record["segment_logprob_sums"] = r.segment_logprob_sums
        if token_logprobs:
            record["token_logprobs"] = r.token_logprobs
        records.append(record)
    write_jsonl(output, records)
    click.echo(f"wrote {len(records)} records to {output}", err=True)
