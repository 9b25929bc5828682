"""The C API (csrc/, promptcot_engine.capi), as installed by `pip install -e .`: compiled clients in fresh processes
(the library starts its own Python) and ctypes in this process (it uses the running one). Every answer must equal
the Python API's, greedy tokens also transformers'; every bad input must come back as an error code and a message."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from promptcot_engine import LLM, SamplingParams, capi
from tests.reference import hf_model

REPO = Path(__file__).resolve().parent.parent
OPTIONS = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 64, "block_size": 8}
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Find the number of positive integers", 'He said "x\\y"\tthen é and ∑ and 🙂', "def solve(n):", "a"]
# pce_status values from csrc/promptcot_engine.h
OK, ERROR_ARGUMENT, ERROR_INPUT = 0, 1, 2
NO_HANG = 600  # seconds: a hung client fails the test instead of blocking the suite

THREADS_C = r"""
#include <promptcot_engine.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

/* argv: library model options_json requests_json...: load the library the way plugin hosts do (dlopen, local
 * symbols), then generate every request on a thread of its own, all at once */
static __typeof__(pce_create) *create;
static __typeof__(pce_generate) *generate;
static __typeof__(pce_free_string) *free_string;
static __typeof__(pce_destroy) *destroy;

typedef struct { pce_engine *engine; const char *requests; char *out; char *err; int status; } job;

static void *work(void *arg) {
    job *j = arg;
    j->status = generate(j->engine, j->requests, &j->out, &j->err);
    return NULL;
}

int main(int argc, char **argv) {
    void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    *(void **)&create = dlsym(library, "pce_create");
    *(void **)&generate = dlsym(library, "pce_generate");
    *(void **)&free_string = dlsym(library, "pce_free_string");
    *(void **)&destroy = dlsym(library, "pce_destroy");
    pce_engine *engine;
    char *err;
    if (create(argv[2], argv[3], &engine, &err) != PCE_OK) { fprintf(stderr, "%s\n", err); return 1; }
    job jobs[16];
    pthread_t threads[16];
    int n = argc - 4;
    for (int i = 0; i < n; i++) {
        jobs[i] = (job){engine, argv[4 + i], NULL, NULL, -1};
        pthread_create(&threads[i], NULL, work, &jobs[i]);
    }
    for (int i = 0; i < n; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < n; i++) {
        printf("%d\t%s\n", jobs[i].status, jobs[i].status == PCE_OK ? jobs[i].out : jobs[i].err);
        free_string(jobs[i].out);
        free_string(jobs[i].err);
    }
    destroy(engine);
    return 0;
}
"""


def as_dicts(outputs) -> list[dict]:
    return [dataclasses.asdict(o) for o in outputs]


def split_floats(value, floats: list[float]):
    """value with its floats taken out into `floats` (the structure is compared exactly, the floats closely)."""
    if isinstance(value, float):
        floats.append(value)
        return float
    if isinstance(value, dict):
        return {k: split_floats(v, floats) for k, v in value.items()}
    if isinstance(value, list):
        return [split_floats(v, floats) for v in value]
    return value


def assert_same_outputs(actual, expected):
    # log-probs can move in the last bits when the prefix cache changes how a prompt's blocks are computed
    actual_floats, expected_floats = [], []
    assert split_floats(actual, actual_floats) == split_floats(expected, expected_floats)
    assert actual_floats == pytest.approx(expected_floats, rel=1e-5, abs=1e-5)


def requests_json(prompts, params) -> str:
    return json.dumps({"prompts": prompts, "sampling_params": params})


def client_env(**extra) -> dict:
    # no PYTHONPATH: the library must find the venv from what it baked in at build time
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def python_llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, **OPTIONS)


@pytest.fixture(scope="module")
def build_flags() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "promptcot_engine.capi", "--cflags", "--libs"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def compile_client(source: Path, output: Path, flags: list[str]) -> Path:
    compiler = ["g++", "-std=c++17"] if source.suffix == ".cpp" else ["gcc", "-std=gnu11", "-pthread"]
    subprocess.run([*compiler, "-O1", "-Wall", "-Werror", str(source), "-o", str(output), *flags], check=True)
    return output


@pytest.fixture(scope="module")
def example_tool(tmp_path_factory, build_flags) -> Path:
    out = tmp_path_factory.mktemp("capi") / "generate_jsonl"
    return compile_client(REPO / "examples" / "generate_jsonl.cpp", out, build_flags)


def run_tool(tool: Path, args: list[str], stdin: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool), *args], input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=client_env(**env), timeout=NO_HANG)


class CApi:
    """The library through ctypes; char* results are taken as addresses so that pce_free_string can free them."""

    def __init__(self, library):
        self.lib = library
        pointer = ctypes.POINTER(ctypes.c_void_p)
        library.pce_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p, pointer, pointer]
        for name in ("pce_generate", "pce_score"):
            getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, pointer, pointer]
        for name in ("pce_create", "pce_generate", "pce_score"):
            getattr(library, name).restype = ctypes.c_int
        library.pce_free_string.argtypes = [ctypes.c_void_p]
        library.pce_destroy.argtypes = [ctypes.c_void_p]

    def _take(self, address: ctypes.c_void_p) -> str | None:
        if address.value is None:
            return None
        text = ctypes.string_at(address.value).decode()
        self.lib.pce_free_string(address)
        return text

    def create(self, model: bytes | None, options: bytes | None) -> tuple[int, int | None, str | None]:
        engine, err = ctypes.c_void_p(), ctypes.c_void_p()
        status = self.lib.pce_create(model, options, ctypes.byref(engine), ctypes.byref(err))
        return status, engine.value, self._take(err)

    def call(self, name: str, engine, text: bytes | None) -> tuple[int, str | None, str | None]:
        out, err = ctypes.c_void_p(), ctypes.c_void_p()
        status = getattr(self.lib, f"pce_{name}")(engine, text, ctypes.byref(out), ctypes.byref(err))
        return status, self._take(out), self._take(err)


@pytest.fixture(scope="module")
def in_process(tiny_llama_dir):
    api = CApi(ctypes.CDLL(str(capi.library_path())))
    status, engine, err = api.create(str(tiny_llama_dir).encode(), json.dumps(OPTIONS).encode())
    assert (status, err) == (OK, None)
    yield api, engine
    api.lib.pce_destroy(engine)


def test_flags_name_the_installed_library_and_header(build_flags):
    library, include = capi.library_path(), capi.include_dir()
    assert (include / "promptcot_engine.h").read_text() == (REPO / "csrc" / "promptcot_engine.h").read_text()
    assert build_flags == [f"-I{include}", f"-L{library.parent}", "-lpromptcot_engine", f"-Wl,-rpath,{library.parent}"]
    lib = ctypes.CDLL(str(library))
    for name in ("pce_create", "pce_generate", "pce_score", "pce_free_string", "pce_destroy"):
        assert hasattr(lib, name)


def test_example_tool_greedy_equals_python_api_and_transformers(example_tool, python_llm, tiny_llama_dir, tmp_path):
    done = run_tool(example_tool, [str(tiny_llama_dir), json.dumps(GREEDY), json.dumps(OPTIONS)],
                    "\n".join(PROMPTS) + "\n", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = as_dicts(python_llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False))
    assert_same_outputs(lines, expected)
    assert [line["prompt"] for line in lines] == PROMPTS

    model, eos = hf_model(tiny_llama_dir), sorted(python_llm.engine.eos_token_ids)
    for line in lines:
        ids = torch.tensor([line["prompt_token_ids"]])
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY["max_tokens"],
                                       do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert line["outputs"][0]["token_ids"] == reference[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("args, message", [
    (["/no/such/model", "{}"], "/no/such/model: no such file or directory"),
    (["{model}", "{temperature: 0}"], "requests_json: invalid JSON"),
    (["{model}", '{"temperature": "0.5"}', json.dumps(OPTIONS)],
     "requests_json.sampling_params.temperature: expected a number"),
])
def test_example_tool_reports_bad_input(example_tool, tiny_llama_dir, tmp_path, args, message):
    args = [a.replace("{model}", str(tiny_llama_dir)) for a in args]
    done = run_tool(example_tool, args, "hello\n", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert message in done.stderr


@pytest.mark.parametrize("env, message", [
    ({"PROMPTCOT_ENGINE_PYTHON": "/no/such/venv/bin/python"}, "cannot import promptcot_engine in Python /no/such/venv"),
    ({"PYTHONHOME": "/no/such/home"}, "cannot start Python from"),
])
def test_a_python_that_cannot_run_the_engine_is_an_error(example_tool, tiny_llama_dir, tmp_path, env, message):
    done = run_tool(example_tool, [str(tiny_llama_dir)], "hello\n", cwd=tmp_path, **env)
    assert (done.returncode, done.stdout) == (1, "")
    assert message in done.stderr and "PROMPTCOT_ENGINE_PYTHON" in done.stderr


def test_concurrent_calls_from_c_threads_of_a_dlopen_host(python_llm, tiny_llama_dir, tmp_path):
    source = tmp_path / "threads.c"
    source.write_text(THREADS_C)
    client = compile_client(source, tmp_path / "threads", [capi.cflags(), "-ldl"])
    batches = [PROMPTS[i:] for i in range(len(PROMPTS))] + [PROMPTS[::-1], ["the", 12]]  # the last one is bad input
    seeded = {"temperature": 1.0, "seed": 7, "max_tokens": 10, "logprobs": True, "n": 2}
    done = subprocess.run([str(client), str(capi.library_path()), str(tiny_llama_dir), json.dumps(OPTIONS),
                           *(requests_json(b, seeded if i % 2 else GREEDY) for i, b in enumerate(batches))],
                          capture_output=True, text=True, cwd=tmp_path, env=client_env(), timeout=NO_HANG)
    assert done.returncode == 0, done.stderr
    results = [line.split("\t", 1) for line in done.stdout.splitlines()]
    for i, (batch, (status, text)) in enumerate(zip(batches, results, strict=True)):
        if i == len(batches) - 1:
            assert (int(status), text) == (ERROR_INPUT, "requests_json.prompts: expected a list of (a string or a list "
                                                        "of (an integer)), got [\"the\", 12]")
            continue
        params = SamplingParams(**(seeded if i % 2 else GREEDY))
        assert int(status) == OK, text
        assert_same_outputs(json.loads(text), as_dicts(python_llm.generate(batch, params, use_tqdm=False)))


def test_in_process_calls_use_the_running_interpreter(in_process, python_llm):
    api, engine = in_process
    params = {"temperature": 0.8, "top_k": 20, "seed": 3, "max_tokens": 8, "logprobs": True, "n": 3}
    expected = as_dicts(python_llm.generate(PROMPTS, SamplingParams(**params), use_tqdm=False))

    # ctypes.CDLL lets go of the GIL during the call (the library takes it back); ctypes.PyDLL keeps holding it,
    # here while the CDLL threads hold the library's lock and need the GIL to finish
    holding_gil = CApi(ctypes.PyDLL(str(capi.library_path())))
    results = [None] * 5
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, api.call("generate", engine, requests_json(PROMPTS, params).encode()))) for i in range(len(results) - 1)]
    for t in threads:
        t.start()
    results[-1] = holding_gil.call("generate", engine, requests_json(PROMPTS, params).encode())
    for t in threads:
        t.join()
    for status, out, err in results:
        assert (status, err) == (OK, None)
        assert_same_outputs(json.loads(out), expected)


def test_score_equals_python_api_and_transformers(in_process, python_llm, tiny_llama_dir):
    api, engine = in_process
    tokens = python_llm.tokenizer.encode("Compute the area", add_special_tokens=False)
    greedy = python_llm.generate([PROMPTS[0]], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    pairs = [{"context": "Find the number of", "continuation": " positive integers n"},
             {"context": tokens, "continuation": [5, 17, 200]},
             {"context": "Let x be", "continuation": [" a real number", [44, 45], " such that"]},
             {"context": PROMPTS[0], "continuation": greedy}]
    status, out, err = api.call("score", engine, json.dumps(pairs).encode())
    assert (status, err) == (OK, None)
    scores = json.loads(out)
    expected = python_llm.score([p["context"] for p in pairs], [p["continuation"] for p in pairs], use_tqdm=False)
    assert_same_outputs(scores, as_dicts(expected))
    assert scores[2]["segment_lengths"][1] == 2 and scores[0]["segment_logprob_sums"] is None
    assert scores[3]["is_greedy"] and not scores[1]["is_greedy"]

    model = hf_model(tiny_llama_dir)
    for pair, score in zip(pairs, scores):
        context = python_llm.tokenizer.encode(pair["context"]) if isinstance(pair["context"], str) else pair["context"]
        ids = torch.tensor([context + score["token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        reference = logprobs[len(context) - 1:].gather(1, ids[0, len(context):, None])[:, 0]
        torch.testing.assert_close(torch.tensor(score["token_logprobs"], dtype=torch.float64), reference,
                                   atol=1e-4, rtol=1e-4)
        assert score["is_greedy"] == bool((logprobs[len(context) - 1:].argmax(-1) == ids[0, len(context):]).all())


@pytest.mark.parametrize("function, text, code, message", [
    ("generate", b"{prompts", ERROR_INPUT, "requests_json: invalid JSON"),
    ("generate", b'{"prompts": ["a"], "sampling_params": {"temperature": "0.5"}}', ERROR_INPUT,
     "requests_json.sampling_params.temperature: expected a number, got \"0.5\""),
    ("generate", b'{"prompts": ["a"], "sampling_params": [{"max_tokens": true}]}', ERROR_INPUT,
     "requests_json.sampling_params[0].max_tokens: expected an integer"),
    ("generate", b'{"prompts": ["a"], "sampling_params": {"top_p": 2}}', ERROR_INPUT, "SamplingParams.top_p"),
    ("generate", b'{"prompts": ["a", "b"], "sampling_params": [{}]}', ERROR_INPUT, "sampling_params: got 1 for 2"),
    ("generate", b'{"prompts": ["a"], "sampling_params": {"temprature": 0}}', ERROR_INPUT, "unknown field 'temprature'"),
    ("generate", b'{"sampling_params": {}}', ERROR_INPUT, "requests_json: missing field 'prompts'"),
    ("generate", b'{"prompts": "a"}', ERROR_INPUT, "requests_json.prompts: expected a list"),
    ("generate", b'{"prompts": [[1, 100000]]}', ERROR_INPUT, "prompt 0"),
    ("generate", b'{"prompts": ["a"], "sampling_params": {"temperature": NaN}}', ERROR_INPUT, "NaN is not JSON"),
    ("generate", b'{"prompts": ["\xff"]}', ERROR_INPUT, "requests_json: not UTF-8"),
    ("generate", b"[]", ERROR_INPUT, "requests_json: expected an object"),
    ("score", b'[{"context": "a"}]', ERROR_INPUT, "pairs_json[0]: missing field 'continuation'"),
    ("score", b'[{"context": 3, "continuation": "b"}]', ERROR_INPUT, "pairs_json[0].context: expected a string"),
    ("score", b'{"context": "a", "continuation": "b"}', ERROR_INPUT, "pairs_json: expected a list of (an object)"),
    ("score", b'[{"context": "a", "continuation": ""}]', ERROR_INPUT, "pair 0: empty continuation"),
    ("generate", None, ERROR_ARGUMENT, "pce_generate: the input JSON is NULL"),
])
def test_bad_input_is_an_error_code_and_message(in_process, function, text, code, message):
    api, engine = in_process
    status, out, err = api.call(function, engine, text)
    assert (status, out) == (code, None)
    assert message in err
    status, out, err = api.call("generate", engine, b'{"prompts": ["a"], "sampling_params": {"max_tokens": 2}}')
    assert (status, err, len(json.loads(out))) == (OK, None, 1)  # the engine is still usable


@pytest.mark.parametrize("model, options, code, message", [
    (b"/no/such/model", b"", ERROR_INPUT, "/no/such/model: no such file or directory"),
    (None, b"", ERROR_ARGUMENT, "pce_create: model is NULL"),
    (b"{model}", b"{device: cpu}", ERROR_INPUT, "options_json: invalid JSON"),
    (b"{model}", b'{"device": 0}', ERROR_INPUT, "options_json.device: expected a string, got 0"),
    (b"{model}", b'{"model": "x"}', ERROR_INPUT, "options_json: unknown field 'model'"),
    (b"{model}", b'{"dtype": "float13"}', ERROR_INPUT, "float13"),
])
def test_bad_create_is_an_error_code_and_message(in_process, tiny_llama_dir, model, options, code, message):
    api, _ = in_process
    model = model.replace(b"{model}", str(tiny_llama_dir).encode()) if model else model
    status, engine, err = api.create(model, options)
    assert (status, engine) == (code, None)
    assert message in err
    assert api.lib.pce_create(None, None, None, None) == ERROR_ARGUMENT  # no handle pointer, no message pointer
