/* The sampler's draw on CPU: each row's token from its logits and one uniform number u, by inverting the
 * row's CDF at u * (total mass). The CPU counterpart of engine/sampler.py's `inverse_cdf` over a softmax, and
 * the same two-level search: the chunk of 1024 tokens whose cumulative mass passes the target, then the token
 * inside it, the first whose cumulative mass within the chunk passes what is left (`right=True`, so that
 * tokens of zero mass are never drawn).
 *
 * Why by hand: in torch this is a widened copy of the logits, a softmax that writes a second [rows, vocab]
 * tensor, then a pass over that for the chunk masses, about 4 ms per decode step of 128 rows of SmolLM2's
 * 49,152 tokens on this project's CPU. Here the weights exp(logit - max) are never stored: a pass for the
 * maximum, a pass for the chunk masses, and the one chosen chunk again; no division (the target scales
 * instead). Masses sum in fp32 within a chunk and in fp64 across chunks, as torch's path does. */
#include "vector.h"

enum { CHUNK = 1024 };

VECTOR_INLINE float row_max(const void *row, int64_t vocab, int dtype) {
    const int64_t vectorized = vocab / LANES * LANES;
    float max = -__builtin_inff();
    if (vectorized > 0) {
        vfloat m = load_lanes(row, 0, dtype);
        for (int64_t i = LANES; i < vectorized; i += LANES) {
            const vfloat v = load_lanes(row, i, dtype);
            m = select_lanes(v > m, v, m);
        }
        max = max_of_lanes(m);
    }
    for (int64_t i = vectorized; i < vocab; i++) {
        const float v = load_element(row, i, dtype);
        if (v > max) max = v;
    }
    return max;
}

/* the sum of exp(logit - max) over tokens [start, end) */
VECTOR_INLINE double chunk_mass(const void *row, int64_t start, int64_t end, float max, int dtype) {
    const int64_t vectorized = start + (end - start) / LANES * LANES;
    vfloat acc = broadcast(0.0f);
    for (int64_t i = start; i < vectorized; i += LANES) acc += exp_nonpositive(load_lanes(row, i, dtype) - max);
    float mass = sum_of_lanes(acc);
    for (int64_t i = vectorized; i < end; i++) mass += exp_nonpositive(broadcast(load_element(row, i, dtype) - max))[0];
    return mass;
}

VECTOR_INLINE int64_t sample_row(const void *row, int64_t vocab, double u, double *cdf, const int dtype) {
    const float max = row_max(row, vocab, dtype);
    if (!(max > -__builtin_inff())) return 0; /* no live token (every logit -inf, or NaN): nothing to invert */
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * CHUNK < vocab ? (c + 1) * CHUNK : vocab;
        total += chunk_mass(row, c * CHUNK, end, max, dtype);
        cdf[c] = total;
    }
    const double target = u * total;
    int64_t chunk = 0;
    while (chunk < chunks - 1 && !(cdf[chunk] > target)) chunk++;
    while (chunk > 0 && !(cdf[chunk] > cdf[chunk - 1])) chunk--; /* rounding went past the last live chunk */
    const double left = target - (chunk > 0 ? cdf[chunk - 1] : 0.0);
    const int64_t start = chunk * CHUNK, end = start + CHUNK < vocab ? start + CHUNK : vocab;
    float weights[CHUNK];
    int64_t i = start;
    for (; i + LANES <= end; i += LANES) {
        const vfloat w = exp_nonpositive(load_lanes(row, i, dtype) - max);
        memcpy(weights + (i - start), &w, sizeof w);
    }
    for (; i < end; i++) weights[i - start] = exp_nonpositive(broadcast(load_element(row, i, dtype) - max))[0];
    double inside = 0.0;
    int64_t last_live = start;
    for (i = start; i < end; i++) {
        if (weights[i - start] > 0.0f) {
            last_live = i;
            inside += weights[i - start];
            if (inside > left) return i;
        }
    }
    return last_live; /* rounding put the target just past the chunk's summed mass */
}

VECTOR_CLONES
static int64_t sample_one(const void *row, int64_t vocab, double u, double *cdf, int dtype) {
    return dtype == DTYPE_FLOAT32 ? sample_row(row, vocab, u, cdf, DTYPE_FLOAT32)
                                  : sample_row(row, vocab, u, cdf, DTYPE_BFLOAT16);
}

/* logits [rows, vocab], rows `row_stride` elements apart, fp32 or bf16; uniform [rows] in [0, 1); tokens
 * [rows] int64. Returns 0; -1 when a work buffer cannot be allocated. */
int pce_cpu_sample_rows(const void *logits, const double *uniform, int64_t *tokens, int64_t rows, int64_t vocab,
                        int64_t row_stride, int dtype) {
    const int element = dtype == DTYPE_FLOAT32 ? 4 : 2;
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    int failed = 0;
#pragma omp parallel
    {
        double *cdf = thread_buffer(sizeof(double) * (chunks > 0 ? chunks : 1), &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (cdf != NULL)
                tokens[r] = sample_one((const char *)logits + r * row_stride * element, vocab, uniform[r], cdf, dtype);
        free(cdf);
    }
    return failed ? -1 : 0;
}
