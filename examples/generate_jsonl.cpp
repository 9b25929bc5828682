// generate_jsonl: prompts on stdin (one per line) -> one JSON line per prompt on stdout, through the C API.
//
// Build: g++ -std=c++17 -O2 examples/generate_jsonl.cpp -o generate_jsonl
//            $(python -m promptcot_engine.capi --cflags --libs)     (one command line)
// Run:   ./generate_jsonl MODEL ['SAMPLING_PARAMS_JSON' ['ENGINE_OPTIONS_JSON']] < prompts.txt > completions.jsonl
//        e.g. ./generate_jsonl smollm2-135m-instruct '{"temperature": 0, "max_tokens": 64}' '{"device": "cpu"}'
// Each output line is a RequestOutput: {"prompt", "prompt_token_ids", "outputs": [{"text", "token_ids", ...}]}.
// Exit status: 0 done, 2 bad input (usage, JSON, model path), 1 anything else.
#include <promptcot_engine.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

namespace {

using LibraryString = std::unique_ptr<char, decltype(&pce_free_string)>;

std::string json_string(const std::string &text) {
    std::string out = "\"";
    for (unsigned char c : text) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
            out += escaped;
        } else {
            out += static_cast<char>(c);  // UTF-8 bytes pass through unchanged
        }
    }
    return out + "\"";
}

// The library returns one JSON array on a single line; print each of its elements on a line of its own.
void print_elements(const std::string &array) {
    int depth = 0;  // 1 directly inside the array
    bool in_string = false, escaped = false;
    std::string element;
    for (char c : array) {
        if (in_string) {
            element += c;
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
            continue;
        }
        if (c == ']' || c == '}') --depth;
        if (depth == 0 || (depth == 1 && c == ',')) {  // the array's own brackets and commas end an element
            if (!element.empty()) std::cout << element << '\n';
            element.clear();
        } else if (depth > 1 || c != ' ') {
            element += c;
        }
        if (c == '[' || c == '{') ++depth;
        if (c == '"') in_string = true;
    }
}

int fail(const char *what, pce_status status, char *message) {
    LibraryString owned(message, pce_free_string);
    std::cerr << "error: " << what << ": " << (message ? message : "(no message)") << '\n';
    return status == PCE_ERROR_INPUT || status == PCE_ERROR_ARGUMENT ? 2 : 1;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        std::cerr << "usage: " << argv[0] << " MODEL ['SAMPLING_PARAMS_JSON' ['ENGINE_OPTIONS_JSON']] < prompts.txt\n";
        return 2;
    }
    std::string requests = "{\"prompts\": [";
    std::string line;
    for (bool first = true; std::getline(std::cin, line); first = false) {
        requests += (first ? "" : ", ") + json_string(line);
    }
    requests += std::string("], \"sampling_params\": ") + (argc > 2 ? argv[2] : "{}") + "}";

    pce_engine *engine = nullptr;
    char *err = nullptr;
    pce_status status = pce_create(argv[1], argc > 3 ? argv[3] : nullptr, &engine, &err);
    if (status != PCE_OK) return fail("loading the model", status, err);
    std::unique_ptr<pce_engine, decltype(&pce_destroy)> owned_engine(engine, pce_destroy);

    char *out = nullptr;
    status = pce_generate(engine, requests.c_str(), &out, &err);
    if (status != PCE_OK) return fail("generating", status, err);
    LibraryString output(out, pce_free_string);
    print_elements(output.get());
    return 0;
}
