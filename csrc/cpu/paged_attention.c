/* Paged decode attention on the CPU: one query token per sequence reads its keys and values straight from
 * the paged KV cache through its block table. The CPU counterpart of kernels/paged_attention.py's Triton
 * kernel, with the same torch reference (`paged_decode_attention_torch`).
 *
 * Why by hand: at decode, attention is a few dot products per cached key, a memory-bound stream over the
 * cache. Written with torch ops it becomes thousands of tiny batched matrix products per layer (one per
 * sequence and KV head, 3 x 64 by 64 x ~128 for SmolLM2) whose fixed cost per product is several times
 * the cost of reading the keys.
 *
 * Here each sequence is one work item, walked in tiles of 16 cached tokens: each tile's rows (every KV head:
 * a token's row holds them side by side, so a block is read front to back) are widened to fp32 once into a
 * small buffer that stays in L1, and every query head reads them from there. Two passes (the scores, an
 * exact softmax, then the values) cost less than an online softmax, whose rescaling per tile and head
 * outweighs reading the sequence's keys and values twice. Blocks lie anywhere in the pool, where the hardware
 * prefetchers do not follow, so the kernel asks for rows ahead itself, a share at each query head of the
 * first pass: the keys two tiles ahead and the tile's values (see Prefetches).
 * All arithmetic is fp32, from fp32 or bf16 caches; bf16 caches on CPUs with AVX512-BF16 take a second path
 * (attend_sequence_bf16_dot, below) that multiplies bf16 pairs without widening them.
 *
 * Threads: OpenMP, built against libgomp.so.1. Loaded after torch, the library binds to the libgomp torch
 * already loaded, so both share one thread pool and torch.set_num_threads governs this kernel as well.
 */
#include "paged_cache.h"

enum { TILE = 16, PREFETCH_TILES = 2 };

/* A row of head_dim values as fp32 vectors in the kernel's lane order. fp32: the row as it is. bf16: each
 * 32 values are read as 16 pairs and split into the even ones (shifted up) and the odd ones (masked), which
 * costs two operations per 32 values where widening them in place costs five or more; a last 16 values, if
 * head_dim is an odd multiple of 16, are widened in place. Queries, keys and values all take this order, so
 * dot products do not see it, and the output undoes it (store_row). */
VECTOR_INLINE void load_row(const void *base, int64_t offset, int dtype, int head_dim, vfloat *dst) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(dst, (const float *)base + offset, sizeof(float) * head_dim);
        return;
    }
    const uint16_t *src = (const uint16_t *)base + offset;
    const int paired = head_dim / (2 * LANES);
    for (int c = 0; c < paired; c++) {
        vuint pairs;
        memcpy(&pairs, src + 2 * LANES * c, sizeof pairs);
        dst[2 * c] = (vfloat)(pairs << 16);
        dst[2 * c + 1] = (vfloat)(pairs & 0xffff0000u);
    }
    if (head_dim % (2 * LANES)) dst[2 * paired] = load_lanes(src, 2 * LANES * paired, DTYPE_BFLOAT16);
}

/* the dimension lane l of vector c holds (see load_row) */
VECTOR_INLINE int dimension_of_lane(int c, int l, int dtype, int head_dim) {
    if (dtype == DTYPE_FLOAT32 || c >= head_dim / (2 * LANES) * 2) return LANES * c + l;
    return 2 * LANES * (c / 2) + 2 * l + c % 2;
}

VECTOR_INLINE void store_row(const vfloat *src, float scale, int dtype, int head_dim, void *base, int64_t offset) {
    for (int c = 0; c < head_dim / LANES; c++) {
        const vfloat v = src[c] * scale;
        for (int l = 0; l < LANES; l++) {
            const int64_t d = offset + dimension_of_lane(c, l, dtype, head_dim);
            if (dtype == DTYPE_FLOAT32) ((float *)base)[d] = v[l];
            else ((uint16_t *)base)[d] = float_to_bf16(v[l]);
        }
    }
}

/* The sum of each of 16 vectors' lanes, as one vector: lane i = the sum of v[i]'s lanes. Four rounds, each
 * adding two shuffles of pairs of vectors, halve the vectors and the lanes left per vector: 45 operations
 * for 16 dot products where reducing each alone takes 8 apiece. v is overwritten. */
VECTOR_INLINE vfloat sum_lanes_of_16(vfloat *v) {
    for (int j = 0; j < 8; j++) /* lanes 0-7: v[2j] folded to 8 partial sums; 8-15: v[2j+1] */
        v[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int j = 0; j < 4; j++) /* four lanes for each of 4 vectors */
        v[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(v[2 * j], v[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int j = 0; j < 2; j++) /* two lanes for each of 8 */
        v[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(v[2 * j], v[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Each query head's scores [tiles] vectors, in place, to exp(score - max) over the context (lanes past it:
 * 0), and 1 / their sum into inv_sum[head]: an exact softmax, normalized when the output is written. */
VECTOR_INLINE void softmax_of_scores(vfloat *scores, int num_heads, int tiles, int context_len, float *inv_sum) {
    for (int h = 0; h < num_heads; h++) {
        vfloat *sh = scores + h * tiles;
        /* the last tile's lanes past the context weigh nothing (lane by lane: an integer vector comparison
         * here crashes GCC 12 under Python's -fwrapv) */
        for (int i = context_len - (tiles - 1) * TILE; i < TILE; i++) sh[tiles - 1][i] = -__builtin_inff();
        vfloat m = sh[0];
        for (int tile = 1; tile < tiles; tile++) m = select_lanes(sh[tile] > m, sh[tile], m);
        const float max = max_of_lanes(m);
        vfloat sum = broadcast(0.0f);
        for (int tile = 0; tile < tiles; tile++) {
            sh[tile] = exp_nonpositive(sh[tile] - max);
            sum += sh[tile];
        }
        inv_sum[h] = 1.0f / sum_of_lanes(sum);
    }
}

/* Per-thread buffers, in vectors: one tile of keys or values of every KV head in lane order; for each query
 * head its scaled query, its output accumulator and its scores over the whole context. */
static int64_t work_vectors(int num_heads, int num_kv_heads, int head_dim, int max_context_len) {
    const int chunks = head_dim / LANES, tiles = (max_context_len + TILE - 1) / TILE;
    return (int64_t)TILE * num_kv_heads * chunks + 2 * (int64_t)num_heads * chunks + (int64_t)num_heads * tiles;
}

/* Rows asked for ahead of their use (a sequence's blocks lie anywhere in the pool, where the hardware
 * prefetchers do not follow), a share at each step of the work before it: asked all at once, they fill the
 * core's miss buffers and stall it until memory answers, and the arithmetic no longer hides the wait. */
typedef struct {
    const char *rows[(PREFETCH_TILES + 1) * TILE];
    int count;
} Prefetches;

/* adds the cache rows (every KV head) of tokens t0 .. t0 + n - 1 */
VECTOR_INLINE void add_rows(Prefetches *p, const void *cache, const int32_t *block_table, int t0, int n, int block_size,
                            int64_t token_stride, int element) {
    int64_t rows[TILE];
    token_rows(block_table, t0, n, block_size, token_stride, rows);
    for (int i = 0; i < n; i++) p->rows[p->count++] = (const char *)cache + rows[i] * element;
}

/* asks for share `step` of `steps` */
VECTOR_INLINE void prefetch_share(const Prefetches *p, int step, int steps, int64_t row_bytes) {
    for (int r = step * p->count / steps; r < (step + 1) * p->count / steps; r++)
        for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(p->rows[r] + line, 0, 2);
}

/* The first pass's requests at a tile: the keys PREFETCH_TILES tiles ahead (at the first tile, every tile
 * up to there), and this tile's values for the second pass. */
VECTOR_INLINE void plan_tile_prefetches(Prefetches *p, const void *k_cache, const void *v_cache,
                                        const int32_t *block_table, int tile, int tiles, int context_len,
                                        int block_size, int64_t token_stride, int element) {
    p->count = 0;
    for (int ahead = tile == 0 ? 1 : PREFETCH_TILES; ahead <= PREFETCH_TILES && tile + ahead < tiles; ahead++) {
        const int ta = (tile + ahead) * TILE, na = context_len - ta < TILE ? context_len - ta : TILE;
        add_rows(p, k_cache, block_table, ta, na, block_size, token_stride, element);
    }
    const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
    add_rows(p, v_cache, block_table, t0, n, block_size, token_stride, element);
}

/* the rows of tokens t0 .. t0 + n - 1, every KV head, into tile[i][kv head] in lane order */
VECTOR_INLINE void load_tile(const void *cache, const int32_t *block_table, int t0, int n, int block_size,
                             int num_kv_heads, int dtype, int head_dim, vfloat *tile) {
    const int chunks = head_dim / LANES;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    int64_t rows[TILE];
    token_rows(block_table, t0, n, block_size, token_stride, rows);
    for (int i = 0; i < n; i++)
        for (int h = 0; h < num_kv_heads; h++)
            load_row(cache, rows[i] + (int64_t)h * head_dim, dtype, head_dim, tile + (i * num_kv_heads + h) * chunks);
}

/* One sequence: every query head over its `context_len` cached tokens, in two passes over tiles of 16
 * tokens: the scores, an exact softmax over them, then the weighted sum of the values. A tile is read for
 * all KV heads at once: a token's row of the cache holds them side by side, so a block is read front to
 * back. Inlined with a constant dtype and head_dim, each combination compiles to straight-line vector code. */
VECTOR_INLINE void attend_sequence(
        const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table, int context_len,
        void *out, int64_t seq, int num_heads, int num_kv_heads, int block_size, float scale, vfloat *work,
        const int dtype, const int head_dim) {
    const int group = num_heads / num_kv_heads, chunks = head_dim / LANES, tiles = (context_len + TILE - 1) / TILE;
    const int element = dtype == DTYPE_FLOAT32 ? 4 : 2;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    vfloat *rows = work, *queries = rows + TILE * num_kv_heads * chunks, *acc = queries + num_heads * chunks;
    vfloat *scores = acc + num_heads * chunks; /* [num_heads, tiles] vectors */
    Prefetches prefetches;

    for (int h = 0; h < num_heads; h++) {
        load_row(q, (seq * num_heads + h) * head_dim, dtype, head_dim, queries + h * chunks);
        for (int c = 0; c < chunks; c++) {
            queries[h * chunks + c] *= scale;
            acc[h * chunks + c] = broadcast(0.0f);
        }
    }

    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        plan_tile_prefetches(&prefetches, k_cache, v_cache, block_table, tile, tiles, context_len, block_size,
                             token_stride, element);
        load_tile(k_cache, block_table, t0, n, block_size, num_kv_heads, dtype, head_dim, rows);
        for (int i = n; i < TILE; i++) /* past the context: copies of the first row, whose scores are dropped */
            for (int c = 0; c < num_kv_heads * chunks; c++) rows[i * num_kv_heads * chunks + c] = rows[c];
        for (int h = 0; h < num_heads; h++) {
            prefetch_share(&prefetches, h, num_heads, token_stride * element);
            const vfloat *qh = queries + h * chunks, *keys = rows + (h / group) * chunks;
            vfloat dots[TILE];
            for (int i = 0; i < TILE; i++) {
                const vfloat *key = keys + i * num_kv_heads * chunks;
                dots[i] = qh[0] * key[0];
                for (int c = 1; c < chunks; c++) dots[i] += qh[c] * key[c];
            }
            scores[h * tiles + tile] = sum_lanes_of_16(dots);
        }
    }
    float inv_sum[num_heads];
    softmax_of_scores(scores, num_heads, tiles, context_len, inv_sum);

    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        load_tile(v_cache, block_table, t0, n, block_size, num_kv_heads, dtype, head_dim, rows);
        for (int h = 0; h < num_heads; h++) {
            const vfloat p = scores[h * tiles + tile], *values = rows + (h / group) * chunks;
            vfloat *ah = acc + h * chunks;
            vfloat a[chunks];
            for (int c = 0; c < chunks; c++) a[c] = ah[c];
            for (int i = 0; i < n; i++) {
                const float w = p[i];
                const vfloat *value = values + i * num_kv_heads * chunks;
                for (int c = 0; c < chunks; c++) a[c] += w * value[c];
            }
            for (int c = 0; c < chunks; c++) ah[c] = a[c];
        }
    }

    for (int h = 0; h < num_heads; h++)
        store_row(acc + h * chunks, inv_sum[h], dtype, head_dim, out, (seq * num_heads + h) * head_dim);
}

VECTOR_CLONES
static void attend_one(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table,
                       int context_len, void *out, int64_t seq, int num_heads, int num_kv_heads, int head_dim,
                       int block_size, float scale, int dtype, vfloat *work) {
    if (context_len <= 0) { /* a padding row: zeros, as the Triton kernel writes */
        const int element = dtype == DTYPE_FLOAT32 ? 4 : 2;
        memset((char *)out + seq * num_heads * head_dim * element, 0, (size_t)num_heads * head_dim * element);
        return;
    }
#define ATTEND(DTYPE, HEAD_DIM) attend_sequence(q, k_cache, v_cache, block_table, context_len, out, seq, num_heads, \
                                                num_kv_heads, block_size, scale, work, DTYPE, HEAD_DIM)
    DISPATCH_DTYPE_AND_HEAD_DIM(ATTEND, dtype, head_dim);
#undef ATTEND
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) /* GCC's target attribute syntax */
/* bf16 caches on CPUs with AVX512-BF16, where vdpbf16ps multiplies 32 bf16 pairs and adds each pair's two
 * products into one of 16 fp32 lanes. Products of two bf16 values are exact in fp32, so the scores need no
 * widening at all: each query row meets the cache's rows as they lie. For the values, two tokens' rows are
 * interleaved (one unpack per 32 values), so that each lane's pair is one dimension of two tokens, and each
 * softmax weight is split into two bf16 parts (hi = bf16(p), lo = bf16(p - hi): 16 significant bits, where
 * the fp32 path keeps 24 and transformers' eager attention 8), each a second vdpbf16ps over the same pairs.
 * Everything is summed in fp32. Compiled for that instruction set alone and chosen at run time. */
#include <immintrin.h>
#define BF16_DOT_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#define BF16_DOT_INLINE static inline __attribute__((always_inline, target("arch=x86-64-v4,avx512bf16")))
#define HAVE_BF16_DOT 1

BF16_DOT_INLINE __m512bh load_pairs(const uint16_t *src) { return (__m512bh)_mm512_loadu_si512(src); }

/* the rows of tokens t0 .. t0 + n - 1 of a tile; past the context, the first one's (finite, weighed 0) */
VECTOR_INLINE void tile_rows(const uint16_t *cache, const int32_t *block_table, int t0, int n, int block_size,
                             int64_t token_stride, const uint16_t **rows) {
    int64_t offsets[TILE];
    token_rows(block_table, t0, n, block_size, token_stride, offsets);
    for (int i = 0; i < TILE; i++) rows[i] = cache + offsets[i < n ? i : 0];
}

BF16_DOT_INLINE void attend_sequence_bf16_dot(
        const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *block_table,
        int context_len, uint16_t *out, int num_heads, int num_kv_heads, int block_size, float scale, vfloat *work,
        const int head_dim) {
    const int group = num_heads / num_kv_heads, vectors = head_dim / 32, chunks = head_dim / LANES;
    const int tiles = (context_len + TILE - 1) / TILE;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    __m512 *pairs = (__m512 *)work; /* [num_kv_heads, TILE / 2, chunks]: a tile's values, two tokens interleaved */
    vfloat *acc = work + num_kv_heads * (TILE / 2) * chunks, *scores = acc + num_heads * chunks;
    const uint16_t *rows[TILE];
    Prefetches prefetches;

    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        plan_tile_prefetches(&prefetches, k_cache, v_cache, block_table, tile, tiles, context_len, block_size,
                             token_stride, 2);
        tile_rows(k_cache, block_table, t0, n, block_size, token_stride, rows);
        for (int h = 0; h < num_heads; h++) {
            prefetch_share(&prefetches, h, num_heads, token_stride * 2);
            __m512bh qh[MAX_HEAD_DIM / 32];
            for (int v = 0; v < vectors; v++) qh[v] = load_pairs(q + h * head_dim + 32 * v);
            const int64_t kv = (int64_t)(h / group) * head_dim;
            vfloat dots[TILE];
            for (int i = 0; i < TILE; i++) {
                __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), qh[0], load_pairs(rows[i] + kv));
                for (int v = 1; v < vectors; v++) d = _mm512_dpbf16_ps(d, qh[v], load_pairs(rows[i] + kv + 32 * v));
                dots[i] = (vfloat)d;
            }
            scores[h * tiles + tile] = sum_lanes_of_16(dots) * scale;
        }
    }
    float inv_sum[num_heads];
    softmax_of_scores(scores, num_heads, tiles, context_len, inv_sum);

    for (int c = 0; c < num_heads * chunks; c++) acc[c] = broadcast(0.0f);
    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        tile_rows(v_cache, block_table, t0, n, block_size, token_stride, rows);
        for (int g = 0; g < num_kv_heads; g++)
            for (int j = 0; j < TILE / 2; j++)
                for (int v = 0; v < vectors; v++) {
                    const __m512i a = _mm512_loadu_si512(rows[2 * j] + g * head_dim + 32 * v);
                    const __m512i b = _mm512_loadu_si512(rows[2 * j + 1] + g * head_dim + 32 * v);
                    pairs[(g * (TILE / 2) + j) * chunks + 2 * v] = (__m512)_mm512_unpacklo_epi16(a, b);
                    pairs[(g * (TILE / 2) + j) * chunks + 2 * v + 1] = (__m512)_mm512_unpackhi_epi16(a, b);
                }
        for (int h = 0; h < num_heads; h++) {
            const __m512 p = (__m512)scores[h * tiles + tile];
            const __m256bh hi = _mm512_cvtneps_pbh(p);
            const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(p, _mm512_cvtpbh_ps(hi)));
            uint32_t weight_hi[TILE / 2], weight_lo[TILE / 2]; /* token pair j: its two weights' bf16 bits */
            memcpy(weight_hi, &hi, sizeof weight_hi);
            memcpy(weight_lo, &lo, sizeof weight_lo);
            const __m512 *values = pairs + (h / group) * (TILE / 2) * chunks;
            /* the hi and lo parts in separate accumulators: two dependency chains of vdpbf16ps, not one */
            __m512 a[MAX_HEAD_DIM / LANES], b[MAX_HEAD_DIM / LANES];
            for (int c = 0; c < chunks; c++) a[c] = (__m512)acc[h * chunks + c], b[c] = _mm512_setzero_ps();
            for (int j = 0; j < TILE / 2; j++) {
                const __m512bh wh = (__m512bh)_mm512_set1_epi32((int)weight_hi[j]);
                const __m512bh wl = (__m512bh)_mm512_set1_epi32((int)weight_lo[j]);
                for (int c = 0; c < chunks; c++) {
                    a[c] = _mm512_dpbf16_ps(a[c], wh, (__m512bh)values[j * chunks + c]);
                    b[c] = _mm512_dpbf16_ps(b[c], wl, (__m512bh)values[j * chunks + c]);
                }
            }
            for (int c = 0; c < chunks; c++) acc[h * chunks + c] = (vfloat)_mm512_add_ps(a[c], b[c]);
        }
    }

    /* accumulators 2v and 2v + 1 hold the 32 dimensions from 32v in runs of four, alternately (the unpack's
     * order): rounded to bf16 (to nearest even, as torch; the instruction reads fp32 denormals as zero),
     * their 64-bit runs interleaved put them back in order */
    const __m512i runs = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    for (int h = 0; h < num_heads; h++) {
        const __m512 inv = _mm512_set1_ps(inv_sum[h]);
        for (int v = 0; v < vectors; v++) {
            const __m256bh a = _mm512_cvtneps_pbh(_mm512_mul_ps((__m512)acc[h * chunks + 2 * v], inv));
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps((__m512)acc[h * chunks + 2 * v + 1], inv));
            _mm512_storeu_si512(out + h * head_dim + 32 * v,
                                _mm512_permutex2var_epi64(_mm512_castsi256_si512((__m256i)a), runs,
                                                          _mm512_castsi256_si512((__m256i)b)));
        }
    }
}

BF16_DOT_TARGET
static void attend_one_bf16_dot(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int32_t *block_table, int context_len, uint16_t *out, int num_heads,
                                int num_kv_heads, int head_dim, int block_size, float scale, vfloat *work) {
#define ATTEND(HEAD_DIM) attend_sequence_bf16_dot(q, k_cache, v_cache, block_table, context_len, out, num_heads, \
                                                  num_kv_heads, block_size, scale, work, HEAD_DIM)
    if (head_dim == 64) ATTEND(64);
    else if (head_dim == 128) ATTEND(128);
    else ATTEND(head_dim);
#undef ATTEND
}

/* what the path was compiled for: x86-64-v4's AVX-512 subsets, and AVX512-BF16 */
static int cpu_has_bf16_dot(void) {
    return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16");
}
#else
static int cpu_has_bf16_dot(void) { return 0; }
#endif

/* Whether this CPU and build take the vdpbf16ps path for bf16 caches (head_dim a multiple of 32). */
int pce_cpu_has_bf16_dot(void) { return cpu_has_bf16_dot(); }

/* q, out [num_seqs, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
 * block_tables [num_seqs, max_blocks_per_seq] int32; context_lens [num_seqs] int32 (0: a padding row, zero
 * output). All contiguous, of one dtype (0 fp32, 1 bf16); head_dim a multiple of 16, at most 256. bf16_dot:
 * nonzero to take the vdpbf16ps path for bf16 where it applies (pce_cpu_has_bf16_dot), 0 for the fp32 one.
 * Returns 0; -1 when a work buffer cannot be allocated; -2 for shapes it does not take. */
int pce_cpu_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                   const int32_t *block_tables, const int32_t *context_lens, void *out,
                                   int64_t num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                   int64_t max_blocks_per_seq, float scale, int dtype, int bf16_dot) {
    if (!attention_shapes_taken(num_heads, num_kv_heads, head_dim, block_size, dtype)) return -2;
    int max_context_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (context_lens[s] > max_context_len) max_context_len = context_lens[s];
    const size_t work_bytes = sizeof(vfloat) * work_vectors(num_heads, num_kv_heads, head_dim, max_context_len);
    bf16_dot = bf16_dot && dtype == DTYPE_BFLOAT16 && head_dim % 32 == 0 && cpu_has_bf16_dot();
    int failed = 0;
#pragma omp parallel
    {
        vfloat *work = thread_buffer(work_bytes, &failed);
        /* dynamic: a thread slowed by anything else on its core hands its share to the other */
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < num_seqs; seq++) {
            if (work == NULL) continue;
#ifdef HAVE_BF16_DOT
            if (bf16_dot && context_lens[seq] > 0) {
                const int64_t row = seq * num_heads * head_dim;
                attend_one_bf16_dot((const uint16_t *)q + row, k_cache, v_cache,
                                    block_tables + seq * max_blocks_per_seq, context_lens[seq], (uint16_t *)out + row,
                                    num_heads, num_kv_heads, head_dim, block_size, scale, work);
                continue;
            }
#endif
            attend_one(q, k_cache, v_cache, block_tables + seq * max_blocks_per_seq, context_lens[seq], out, seq,
                       num_heads, num_kv_heads, head_dim, block_size, scale, dtype, work);
        }
        free(work);
    }
    return failed ? -1 : 0;
}
