/* What the CPU kernels share: 16-lane fp32 vectors in GCC/Clang vector extensions, bf16 <-> fp32, lane sums and
 * maxima, the exp of a softmax, and their threads' work buffers. Header-only (static inline): each kernel file
 * compiles its own copy, clones included. */
#ifndef PCE_CPU_VECTOR_H
#define PCE_CPU_VECTOR_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* one build for any x86-64: the loader picks the AVX-512 clone where the CPU has it */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define VECTOR_CLONES
#endif

/* every helper is inlined into its caller, so that it takes the caller's clone (a call across the clone
 * boundary would pass vectors through memory, in the default target's ABI) */
#define VECTOR_INLINE static inline __attribute__((always_inline))

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };
/* 16 fp32 lanes in GCC/Clang vector extensions: one AVX-512 register (two AVX2 or four SSE ones elsewhere).
 * Lane reductions use shuffles: a scalar loop over the lanes (what a plain C reduction becomes without
 * -ffast-math) costs more than the products themselves. */
#define LANES 16
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));
typedef uint32_t vuint __attribute__((vector_size(4 * LANES)));
typedef uint16_t vhalf __attribute__((vector_size(2 * LANES)));

VECTOR_INLINE vfloat broadcast(float x) {
    vfloat v; /* lane by lane: (vfloat){0} + x would turn -0.0 into +0.0 */
    for (int l = 0; l < LANES; l++) v[l] = x;
    return v;
}

VECTOR_INLINE uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch's .to(torch.bfloat16) */
    return (uint16_t)(bits >> 16);
}

/* 16 consecutive elements of an fp32 or bf16 array as fp32 lanes, and back (bf16 rounded to nearest even,
 * NaN kept NaN, as torch rounds) */
VECTOR_INLINE vfloat load_lanes(const void *base, int64_t i, int dtype) {
    vfloat v;
    if (dtype == DTYPE_FLOAT32) {
        memcpy(&v, (const float *)base + i, sizeof v);
    } else {
        vhalf h;
        memcpy(&h, (const uint16_t *)base + i, sizeof h);
        v = (vfloat)(__builtin_convertvector(h, vuint) << 16);
    }
    return v;
}

/* one element of an fp32 or bf16 array, as fp32 (the scalar tails of the vector loops) */
VECTOR_INLINE float load_element(const void *base, int64_t i, int dtype) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

VECTOR_INLINE vuint bf16_rounded_bits(vfloat v) {
    const vuint bits = (vuint)v;
    const vuint rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const vint nan = v != v;
    return (vuint)(((vint)(bits | 0x00400000u) & nan) | ((vint)rounded & ~nan));
}

/* v rounded to the dtype, as fp32 lanes: the value torch holds after an op in that dtype */
VECTOR_INLINE vfloat round_lanes(vfloat v, int dtype) {
    return dtype == DTYPE_FLOAT32 ? v : (vfloat)(bf16_rounded_bits(v) & 0xffff0000u);
}

VECTOR_INLINE void store_lanes(void *base, int64_t i, vfloat v, int dtype) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy((float *)base + i, &v, sizeof v);
    } else {
        const vhalf h = __builtin_convertvector(bf16_rounded_bits(v) >> 16, vhalf);
        memcpy((uint16_t *)base + i, &h, sizeof h);
    }
}

VECTOR_INLINE float sum_of_lanes(vfloat v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

VECTOR_INLINE vfloat select_lanes(vint mask, vfloat if_true, vfloat if_false) {
    return (vfloat)((mask & (vint)if_true) | (~mask & (vint)if_false));
}

VECTOR_INLINE float max_of_lanes(vfloat v) {
    vfloat s = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = select_lanes(v > s, v, s);
    s = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = select_lanes(v > s, v, s);
    s = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = select_lanes(v > s, v, s);
    s = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    v = select_lanes(v > s, v, s);
    return v[0];
}

/* exp(x) for x <= 0 (softmax after subtracting the max), lane-wise, without a vector math library:
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^7 (error below one fp32 ulp),
 * 2^n put in the exponent bits. Below -87 (and at -inf) the result is under fp32's smallest normal: 0. */
VECTOR_INLINE vfloat exp_nonpositive(vfloat x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vint underflow = x < broadcast(-87.0f);
    const vfloat xc = select_lanes(underflow, broadcast(-87.0f), x);
    const vfloat n = (xc * log2e + round_magic) - round_magic;
    const vfloat r = (xc - n * ln2_hi) - n * ln2_lo;
    vfloat p = broadcast(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vfloat two_n = (vfloat)((__builtin_convertvector(n, vint) + 127) << 23);
    return select_lanes(underflow, broadcast(0.0f), p * two_n);
}

/* A thread's work buffer inside a kernel's parallel region, aligned for vectors; NULL when it cannot be had,
 * and then *failed is set (the kernel skips its share and returns -1). */
static inline void *thread_buffer(size_t bytes, int *failed) {
    void *buffer = aligned_alloc(sizeof(vfloat), (bytes + sizeof(vfloat) - 1) / sizeof(vfloat) * sizeof(vfloat));
    if (buffer == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

#endif
