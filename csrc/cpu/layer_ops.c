/* The decoder's elementwise steps on CPU, one call each where torch runs several ops: RMSNorm (with the residual
 * add before it) and rotary position embedding. At decode they process a few hundred KB per layer, where each
 * torch op costs its dispatch and a pass over memory; these take one pass, threads split over rows.
 * (SiLU(gate) * up stays with torch: its vectorized exp beat this file's polynomial one, 77 against 120 us for
 * 128 x 1536 in bf16, and still matches it with fused multiply-adds allowed, ~90 us each.)
 *
 * Each rounds where torch rounds, so bf16 results equal torch's bf16 ops (models/decoder.py, models/rope.py) and
 * fp32 ones equal torch's fp32 ops up to the order of a sum (RMSNorm's mean) and its rsqrt: floating
 * multiply-adds are not fused here (fp-contract=off), since torch computes x * cos + y * sin as three ops. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include "vector.h"

/* x rounded to the dtype, back as fp32: the value torch would hold after this op */
VECTOR_INLINE float round_to(float x, int dtype) {
    if (dtype == DTYPE_FLOAT32) return x;
    uint32_t bits = (uint32_t)float_to_bf16(x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

VECTOR_INLINE void store_element(void *base, int64_t i, float x, int dtype) {
    if (dtype == DTYPE_FLOAT32) ((float *)base)[i] = x;
    else ((uint16_t *)base)[i] = float_to_bf16(x);
}

/* out[r] = weight * dtype(x[r] / sqrt(mean(x[r]^2) + eps)), the normalization in fp32 (transformers' order).
 * With a residual row, x[r] is first added to it, in place and rounded to the dtype (vLLM's fused add and
 * norm: the residual stream's add, then the next norm, in one pass), and the sum is normalized.
 * Inlined with a constant dtype, so that each dtype gets its own vector code. */
VECTOR_INLINE void rms_norm_row(const void *x, void *residual, const void *weight, void *out, int hidden, float eps,
                                const int dtype) {
    const int vectorized = hidden / LANES * LANES;
    if (residual != NULL) {
        for (int d = 0; d < vectorized; d += LANES)
            store_lanes(residual, d, load_lanes(x, d, dtype) + load_lanes(residual, d, dtype), dtype);
        for (int d = vectorized; d < hidden; d++)
            store_element(residual, d, load_element(x, d, dtype) + load_element(residual, d, dtype), dtype);
        x = residual;
    }
    vfloat acc = broadcast(0.0f);
    for (int d = 0; d < vectorized; d += LANES) {
        const vfloat v = load_lanes(x, d, dtype);
        acc += v * v;
    }
    float sum_squares = sum_of_lanes(acc);
    for (int d = vectorized; d < hidden; d++) {
        const float v = load_element(x, d, dtype);
        sum_squares += v * v;
    }
    const float inv_rms = 1.0f / __builtin_sqrtf(sum_squares / hidden + eps);
    for (int d = 0; d < vectorized; d += LANES)
        store_lanes(out, d, load_lanes(weight, d, dtype) * round_lanes(load_lanes(x, d, dtype) * inv_rms, dtype), dtype);
    for (int d = vectorized; d < hidden; d++)
        store_element(out, d, load_element(weight, d, dtype) * round_to(load_element(x, d, dtype) * inv_rms, dtype),
                      dtype);
}

VECTOR_CLONES
static void rms_norm_one(const void *x, void *residual, const void *weight, void *out, int hidden, float eps,
                         int dtype) {
    if (dtype == DTYPE_FLOAT32) rms_norm_row(x, residual, weight, out, hidden, eps, DTYPE_FLOAT32);
    else rms_norm_row(x, residual, weight, out, hidden, eps, DTYPE_BFLOAT16);
}

/* x rows `x_stride` elements apart; residual NULL or [rows, hidden] contiguous (then x is added to it in
 * place first); weight [hidden]; out [rows, hidden] contiguous. The threads' loop stays outside the cloned
 * functions: OpenMP outlines a loop body into a function of the default target. */
int pce_cpu_rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t rows, int hidden,
                     int64_t x_stride, float eps, int dtype) {
    const int element = dtype == DTYPE_FLOAT32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_one((const char *)x + r * x_stride * element,
                     residual == NULL ? NULL : (char *)residual + r * hidden * element, weight,
                     (char *)out + r * hidden * element, hidden, eps, dtype);
    return 0;
}

/* out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half]), each product and the sum
 * rounded to the dtype as torch's three ops round them. Halves of a multiple of 16 go 16 lanes at a time. */
VECTOR_INLINE void rotary_token(const void *x, int64_t head_stride, const void *cos, const void *sin, void *out,
                                int heads, int head_dim, const int dtype) {
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        const int64_t xi = h * head_stride, oi = (int64_t)h * head_dim;
        if (half % LANES == 0) {
            for (int d = 0; d < half; d += LANES) {
                const vfloat x1 = load_lanes(x, xi + d, dtype), x2 = load_lanes(x, xi + d + half, dtype);
                const vfloat first = round_lanes(x1 * load_lanes(cos, d, dtype), dtype)
                                     + round_lanes(-x2 * load_lanes(sin, d, dtype), dtype);
                const vfloat second = round_lanes(x2 * load_lanes(cos, d + half, dtype), dtype)
                                      + round_lanes(x1 * load_lanes(sin, d + half, dtype), dtype);
                store_lanes(out, oi + d, first, dtype);
                store_lanes(out, oi + d + half, second, dtype);
            }
            continue;
        }
        for (int d = 0; d < head_dim; d++) {
            const float rotated = d < half ? -load_element(x, xi + d + half, dtype) : load_element(x, xi + d - half, dtype);
            const float a = round_to(load_element(x, xi + d, dtype) * load_element(cos, d, dtype), dtype);
            const float b = round_to(rotated * load_element(sin, d, dtype), dtype);
            store_element(out, oi + d, a + b, dtype);
        }
    }
}

VECTOR_CLONES
static void rotary_one(const void *x, int64_t head_stride, const void *cos, const void *sin, void *out, int heads,
                       int head_dim, int dtype) {
    if (dtype == DTYPE_FLOAT32) rotary_token(x, head_stride, cos, sin, out, heads, head_dim, DTYPE_FLOAT32);
    else rotary_token(x, head_stride, cos, sin, out, heads, head_dim, DTYPE_BFLOAT16);
}

/* x [tokens, heads, head_dim] with strides in elements; cos, sin [tokens, head_dim] contiguous; out [tokens,
 * heads, head_dim] contiguous. */
int pce_cpu_rotary(const void *x, const void *cos, const void *sin, void *out, int64_t tokens, int heads,
                   int head_dim, int64_t token_stride, int64_t head_stride, int dtype) {
    const int element = dtype == DTYPE_FLOAT32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        rotary_one((const char *)x + t * token_stride * element, head_stride,
                   (const char *)cos + t * head_dim * element, (const char *)sin + t * head_dim * element,
                   (char *)out + t * heads * head_dim * element, heads, head_dim, dtype);
    return 0;
}
