/*
 * promptcot_engine.h: the C API of promptcot_engine (generate and score from C and C++).
 *
 * The library runs the same Python engine as `from promptcot_engine import LLM`: it embeds CPython.
 *   - In a plain C/C++ process the first call starts an interpreter: the Python the library was built with
 *     (its virtual environment included), or the python executable named by the environment variable
 *     PROMPTCOT_ENGINE_PYTHON. The interpreter lives until the process exits; it installs no signal handlers.
 *   - In a process that already runs Python (e.g. loaded with ctypes) it uses that interpreter.
 *
 * Error convention (every function that can fail):
 *   returns PCE_OK (0) on success or one of the pce_status codes below;
 *   the last parameter `char **err` receives NULL on success and, on failure, a readable UTF-8 message
 *   (naming the field, index or file at fault) that the caller frees with pce_free_string;
 *   err may be NULL when the caller does not want the message. Output pointers are NULL after a failure.
 *   A failed call leaves the engine usable.
 *
 * Threads: any thread may call any function. Calls run one at a time: a process-wide lock serializes them
 * and each call holds the Python GIL while it runs (it takes the GIL itself with PyGILState_Ensure; a caller
 * that already holds the GIL may call too). Concurrent calls are therefore safe but not parallel.
 *
 * JSON (UTF-8 text; it mirrors the Python API, see csrc/README.md for examples):
 *   options_json   NULL, "" or an object of LLM keyword arguments:
 *                  {"dtype": "float32", "device": "cpu", "seed": 0, "max_num_seqs": 256, "num_kv_blocks": 64, ...}
 *   requests_json  {"prompts": ["text", [1, 2, 3]],            strings or token-id lists
 *                   "sampling_params": {"temperature": 0, "max_tokens": 32, ...}}
 *                  sampling_params is optional, one object for every prompt or a list with one per prompt;
 *                  its fields are SamplingParams' (n, temperature, top_p, top_k, min_p, seed, max_tokens,
 *                  min_tokens, stop, stop_token_ids, ignore_eos, logprobs, skip_special_tokens).
 *   generate output [{"request_id", "prompt", "prompt_token_ids", "finished",
 *                     "outputs": [{"index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason"}]}]
 *                  one element per prompt, in order; finish_reason is "stop" or "length".
 *   pairs_json     [{"context": "text" | [ids], "continuation": "text" | [ids] | ["segment", [ids], ...]}]
 *   score output   [{"token_ids", "token_logprobs", "logprob_sum", "is_greedy",
 *                    "segment_logprob_sums", "segment_lengths"}]   (the segment fields are null unless segmented)
 */
#ifndef PROMPTCOT_ENGINE_H
#define PROMPTCOT_ENGINE_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PCE_API __attribute__((visibility("default")))
#else
#define PCE_API
#endif

typedef enum pce_status {
    PCE_OK = 0,
    PCE_ERROR_ARGUMENT = 1, /* a required pointer argument is NULL */
    PCE_ERROR_INPUT = 2,    /* bad input: invalid JSON, an unknown field, a wrong type or value, a bad model path */
    PCE_ERROR_PYTHON = 3,   /* Python could not be started, or promptcot_engine cannot be imported from it */
    PCE_ERROR_ENGINE = 4    /* any other failure inside the engine; the message carries the Python traceback */
} pce_status;

/* Opaque handle to one loaded model (a promptcot_engine.LLM). */
typedef struct pce_engine pce_engine;

/* Load `model` (an HF checkpoint directory, a .gguf file or "smollm2-135m-instruct") into a new engine. */
PCE_API pce_status pce_create(const char *model, const char *options_json, pce_engine **engine, char **err);

/* Generate completions; *out_json receives the output array (free it with pce_free_string). */
PCE_API pce_status pce_generate(pce_engine *engine, const char *requests_json, char **out_json, char **err);

/* Teacher-forced log-likelihood of each continuation given its context; *out_json as for pce_generate. */
PCE_API pce_status pce_score(pce_engine *engine, const char *pairs_json, char **out_json, char **err);

/* Free a string returned by this library (an output or an error message). NULL is allowed. */
PCE_API void pce_free_string(char *s);

/* Release the engine and its memory. NULL is allowed; the handle must not be used afterwards. */
PCE_API void pce_destroy(pce_engine *engine);

#ifdef __cplusplus
}
#endif

#endif /* PROMPTCOT_ENGINE_H */
