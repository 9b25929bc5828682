/* The C API: a thin shell that hands JSON text to promptcot_engine.capi.bridge in an embedded (or the host's)
 * Python interpreter. The contract (errors, threads, JSON) is documented in promptcot_engine.h. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "promptcot_engine.h"

#ifndef PCE_PYTHON_EXECUTABLE
#error "setup.py defines PCE_PYTHON_EXECUTABLE: the python executable of the environment the library is built for"
#endif

struct pce_engine {
    PyObject *llm;
};

/* Serializes every call: the engine is not reentrant, and one lock also makes interpreter start-up race-free. */
static pthread_mutex_t library_lock = PTHREAD_MUTEX_INITIALIZER;
/* Set once under library_lock; an interpreter that failed to start cannot be started again in this process. */
static char *startup_failure;
static PyObject *bridge;      /* promptcot_engine.capi.bridge */
static PyObject *input_error; /* promptcot_engine.errors.InputError */

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, s, n);
    return copy;
}

static pce_status fail(char **err, pce_status code, const char *format, ...) {
    if (!err) return code;
    va_list args;
    va_start(args, format);
    int n = vsnprintf(NULL, 0, format, args);
    va_end(args);
    *err = malloc((size_t)n + 1);
    if (*err) {
        va_start(args, format);
        vsnprintf(*err, (size_t)n + 1, format, args);
        va_end(args);
    }
    return code;
}

/* Take the pending Python exception: its status, and its message as a malloc'd string (GIL held). */
static char *take_python_error(pce_status *code) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback && value) PyException_SetTraceback(value, traceback);
    *code = input_error && PyErr_GivenExceptionMatches(type, input_error) ? PCE_ERROR_INPUT : PCE_ERROR_ENGINE;
    PyObject *message = bridge ? PyObject_CallMethod(bridge, "error_message", "O", value ? value : Py_None)
                               : PyObject_Str(value ? value : Py_None);
    const char *text = message ? PyUnicode_AsUTF8(message) : NULL;
    if (!text) PyErr_Clear();
    char *copy = copy_string(text ? text : "a Python error that could not be formatted");
    Py_XDECREF(message);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return copy;
}

static pce_status python_failure(char **err) {
    pce_status code;
    char *message = take_python_error(&code);
    fail(err, code, "%s", message ? message : "out of memory formatting a Python error");
    free(message);
    return code;
}

/* The extension modules Python loads (torch's included) look up the Py* symbols in the process's global scope.
 * A host that dlopen()ed this library with RTLD_LOCAL left it and its libpython out of that scope: promote them. */
static void make_python_symbols_global(void) {
    Dl_info self;
    if (dladdr(&library_lock, &self) && self.dli_fname) dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
}

/* Start our own interpreter unless one runs already (library_lock held, GIL not held). */
static pce_status start_python(char **err) {
    if (Py_IsInitialized()) return PCE_OK;
    if (startup_failure) return fail(err, PCE_ERROR_PYTHON, "%s", startup_failure);
    make_python_symbols_global();
    const char *python = getenv("PROMPTCOT_ENGINE_PYTHON");
    if (!python || !*python) python = PCE_PYTHON_EXECUTABLE;

    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* SIGINT and friends stay the host program's */
    /* Python derives its prefix from the executable's path, and a venv's from the pyvenv.cfg beside it. */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        fail(&startup_failure, PCE_ERROR_PYTHON, "cannot start Python from %s (%s%s%s); set PROMPTCOT_ENGINE_PYTHON "
             "to the python executable of the environment where promptcot_engine is installed", python,
             status.func ? status.func : "", status.func ? ": " : "", status.err_msg ? status.err_msg : "exit requested");
        return fail(err, PCE_ERROR_PYTHON, "%s", startup_failure ? startup_failure : "cannot start Python");
    }
    PyEval_SaveThread(); /* hand the GIL back so that any thread can take it with PyGILState_Ensure */
    return PCE_OK;
}

/* Import the bridge once (GIL held). */
static pce_status import_bridge(char **err) {
    if (bridge) return PCE_OK;
    PyObject *module = PyImport_ImportModule("promptcot_engine.capi.bridge");
    PyObject *errors = module ? PyImport_ImportModule("promptcot_engine.errors") : NULL;
    PyObject *input_error_type = errors ? PyObject_GetAttrString(errors, "InputError") : NULL;
    Py_XDECREF(errors);
    if (input_error_type) {
        bridge = module;
        input_error = input_error_type;
        return PCE_OK;
    }
    Py_XDECREF(module);
    pce_status ignored;
    char *cause = take_python_error(&ignored);
    PyObject *sys_executable = PySys_GetObject("executable"); /* borrowed */
    const char *executable = sys_executable ? PyUnicode_AsUTF8(sys_executable) : NULL;
    if (!executable) PyErr_Clear();
    fail(err, PCE_ERROR_PYTHON, "cannot import promptcot_engine in Python %s: %s; set PROMPTCOT_ENGINE_PYTHON to the "
         "python executable of the environment where promptcot_engine is installed",
         executable ? executable : "(unknown)", cause ? cause : "out of memory");
    free(cause);
    return PCE_ERROR_PYTHON;
}

typedef struct {
    PyGILState_STATE gil;
} pce_call;

/* Take the library lock, then the GIL. A caller already holding the GIL (ctypes.PyDLL) lets go of it while it
 * waits for the lock: the thread holding the lock may be waiting for the GIL. */
static pce_status enter(pce_call *call, char **err) {
    if (Py_IsInitialized() && PyGILState_Check()) {
        PyThreadState *state = PyEval_SaveThread();
        pthread_mutex_lock(&library_lock);
        PyEval_RestoreThread(state);
    } else {
        pthread_mutex_lock(&library_lock);
    }
    pce_status status = start_python(err);
    if (status != PCE_OK) {
        pthread_mutex_unlock(&library_lock);
        return status;
    }
    call->gil = PyGILState_Ensure();
    status = import_bridge(err);
    if (status != PCE_OK) {
        PyGILState_Release(call->gil);
        pthread_mutex_unlock(&library_lock);
    }
    return status;
}

static void leave(pce_call *call) {
    PyGILState_Release(call->gil);
    pthread_mutex_unlock(&library_lock);
}

/* bridge.<function>(llm, json_bytes) -> str, copied into *out_json (GIL held). */
static pce_status call_bridge(const char *function, PyObject *llm, const char *json, char **out_json, char **err) {
    PyObject *result = PyObject_CallMethod(bridge, function, "Oy", llm, json);
    if (!result) return python_failure(err);
    const char *text = PyUnicode_AsUTF8(result);
    pce_status status = PCE_OK;
    if (!text) status = python_failure(err);
    else if (!(*out_json = copy_string(text))) status = fail(err, PCE_ERROR_ENGINE, "out of memory copying the output");
    Py_DECREF(result);
    return status;
}

pce_status pce_create(const char *model, const char *options_json, pce_engine **engine, char **err) {
    if (err) *err = NULL;
    if (!engine) return fail(err, PCE_ERROR_ARGUMENT, "pce_create: engine (the output handle pointer) is NULL");
    *engine = NULL;
    if (!model) return fail(err, PCE_ERROR_ARGUMENT, "pce_create: model is NULL");
    pce_call call;
    pce_status status = enter(&call, err);
    if (status != PCE_OK) return status;
    PyObject *llm = PyObject_CallMethod(bridge, "create", "yy", model, options_json ? options_json : "");
    if (!llm) {
        status = python_failure(err);
    } else if (!(*engine = malloc(sizeof(pce_engine)))) {
        Py_DECREF(llm);
        status = fail(err, PCE_ERROR_ENGINE, "out of memory allocating the engine handle");
    } else {
        (*engine)->llm = llm;
    }
    leave(&call);
    return status;
}

static pce_status run(const char *function, pce_engine *engine, const char *json, char **out_json, char **err) {
    if (err) *err = NULL;
    if (!out_json) return fail(err, PCE_ERROR_ARGUMENT, "pce_%s: out_json is NULL", function);
    *out_json = NULL;
    if (!engine) return fail(err, PCE_ERROR_ARGUMENT, "pce_%s: engine is NULL", function);
    if (!json) return fail(err, PCE_ERROR_ARGUMENT, "pce_%s: the input JSON is NULL", function);
    pce_call call;
    pce_status status = enter(&call, err);
    if (status != PCE_OK) return status;
    status = call_bridge(function, engine->llm, json, out_json, err);
    leave(&call);
    return status;
}

pce_status pce_generate(pce_engine *engine, const char *requests_json, char **out_json, char **err) {
    return run("generate", engine, requests_json, out_json, err);
}

pce_status pce_score(pce_engine *engine, const char *pairs_json, char **out_json, char **err) {
    return run("score", engine, pairs_json, out_json, err);
}

void pce_free_string(char *s) { free(s); }

void pce_destroy(pce_engine *engine) {
    if (!engine) return;
    pce_call call;
    if (enter(&call, NULL) == PCE_OK) { /* it cannot fail once an engine exists */
        Py_DECREF(engine->llm);
        PyGC_Collect(); /* the engine's KV cache and weights go now, not at some later collection */
        leave(&call);
    }
    free(engine);
}
