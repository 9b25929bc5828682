/* Paged decode attention on the CPU: one query token per sequence reads its keys and values straight from
 * the paged KV cache through its block table. The CPU counterpart of kernels/paged_attention.py's Triton
 * kernel, with the same torch reference (`paged_decode_attention_torch`).
 *
 * Why by hand: at decode, attention is a few dot products per cached key, a memory-bound stream over the
 * cache. Written with torch ops it becomes thousands of tiny batched matrix products per layer (one per
 * sequence and KV head, 3 x 64 by 64 x ~128 for SmolLM2) whose fixed cost per product is several times
 * the cost of reading the keys.
 *
 * Here each (sequence, KV head) is one work item, walked in tiles of 16 cached tokens: each tile's rows are
 * widened to fp32 once into a small buffer that stays in L1, and every query head of the group reads them
 * from there. Two passes (the scores, an exact softmax, then the values) cost less than an online softmax,
 * whose rescaling per tile and head outweighs reading the item's keys and values (a few KB per hundred
 * tokens, still in L2) twice. All arithmetic is fp32, from fp32 or bf16 caches.
 *
 * Threads: OpenMP, built against libgomp.so.1. Loaded after torch, the library binds to the libgomp torch
 * already loaded, so both share one thread pool and torch.set_num_threads governs this kernel as well.
 */
#include "vector.h"

enum { TILE = 16, MAX_HEAD_DIM = 256 };

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
    if (head_dim % (2 * LANES)) {
        vhalf tail;
        memcpy(&tail, src + 2 * LANES * paired, sizeof tail);
        dst[2 * paired] = (vfloat)(__builtin_convertvector(tail, vuint) << 16);
    }
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

/* Per-thread buffers, in vectors: one tile of keys or values in lane order; for each query head of the
 * group its scaled query, its output accumulator and its scores over the whole context. */
static int64_t work_vectors(int group, int head_dim, int max_context_len) {
    const int chunks = head_dim / LANES;
    return (int64_t)TILE * chunks + 2 * (int64_t)group * chunks + (int64_t)group * ((max_context_len + TILE - 1) / TILE);
}

/* the rows of tokens t0 .. t0 + n - 1 of one head into `tile`, in lane order */
VECTOR_INLINE void load_tile(const void *cache, const int32_t *block_table, int t0,
                                                             int n, int block_size, int64_t token_stride,
                                                             int64_t head_offset, int dtype, int head_dim, vfloat *tile) {
    const int chunks = head_dim / LANES;
    int block = t0 / block_size, in_block = t0 % block_size;
    for (int i = 0; i < n; i++) {
        load_row(cache, ((int64_t)block_table[block] * block_size + in_block) * token_stride + head_offset, dtype,
                 head_dim, tile + i * chunks);
        if (++in_block == block_size) {
            block++;
            in_block = 0;
        }
    }
}

/* One sequence, one KV head: its `group` query heads over `context_len` cached tokens, in two passes over
 * tiles of 16 tokens: the scores of every query head, an exact softmax over them, then the weighted sum of
 * the values. Inlined with a constant dtype and head_dim, each combination compiles to straight-line
 * vector code. */
VECTOR_INLINE void attend_item(
        const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table, int context_len,
        void *out, int64_t seq, int kv_head, int num_heads, int num_kv_heads, int block_size, float scale,
        vfloat *work, const int dtype, const int head_dim) {
    const int group = num_heads / num_kv_heads, chunks = head_dim / LANES, tiles = (context_len + TILE - 1) / TILE;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim, first_head = (int64_t)kv_head * group;
    const int64_t head_offset = (int64_t)kv_head * head_dim;
    vfloat *rows = work, *queries = rows + TILE * chunks, *acc = queries + group * chunks;
    vfloat *scores = acc + group * chunks; /* [group, tiles] vectors */

    for (int g = 0; g < group; g++) {
        load_row(q, (seq * num_heads + first_head + g) * head_dim, dtype, head_dim, queries + g * chunks);
        for (int c = 0; c < chunks; c++) {
            queries[g * chunks + c] *= scale;
            acc[g * chunks + c] = broadcast(0.0f);
        }
    }

    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        load_tile(k_cache, block_table, t0, n, block_size, token_stride, head_offset, dtype, head_dim, rows);
        for (int i = n; i < TILE; i++) /* past the context: copies of the first row, whose scores are dropped */
            for (int c = 0; c < chunks; c++) rows[i * chunks + c] = rows[c];
        for (int g = 0; g < group; g++) {
            const vfloat *qg = queries + g * chunks;
            vfloat dots[TILE];
            for (int i = 0; i < TILE; i++) {
                dots[i] = qg[0] * rows[i * chunks];
                for (int c = 1; c < chunks; c++) dots[i] += qg[c] * rows[i * chunks + c];
            }
            scores[g * tiles + tile] = sum_lanes_of_16(dots);
        }
    }
    float inv_sum[group];
    for (int g = 0; g < group; g++) {
        vfloat *sg = scores + g * tiles;
        /* the last tile's lanes past the context weigh nothing (lane by lane: an integer vector comparison
         * here crashes GCC 12 under Python's -fwrapv) */
        for (int i = context_len - (tiles - 1) * TILE; i < TILE; i++) sg[tiles - 1][i] = -__builtin_inff();
        vfloat m = sg[0];
        for (int tile = 1; tile < tiles; tile++) m = select_lanes(sg[tile] > m, sg[tile], m);
        const float max = max_of_lanes(m);
        vfloat sum = broadcast(0.0f);
        for (int tile = 0; tile < tiles; tile++) {
            sg[tile] = exp_nonpositive(sg[tile] - max);
            sum += sg[tile];
        }
        inv_sum[g] = 1.0f / sum_of_lanes(sum);
    }

    for (int tile = 0; tile < tiles; tile++) {
        const int t0 = tile * TILE, n = context_len - t0 < TILE ? context_len - t0 : TILE;
        load_tile(v_cache, block_table, t0, n, block_size, token_stride, head_offset, dtype, head_dim, rows);
        for (int g = 0; g < group; g++) {
            const vfloat p = scores[g * tiles + tile];
            vfloat *ag = acc + g * chunks;
            vfloat a[chunks];
            for (int c = 0; c < chunks; c++) a[c] = ag[c];
            for (int i = 0; i < n; i++) {
                const float w = p[i];
                for (int c = 0; c < chunks; c++) a[c] += w * rows[i * chunks + c];
            }
            for (int c = 0; c < chunks; c++) ag[c] = a[c];
        }
    }

    for (int g = 0; g < group; g++)
        store_row(acc + g * chunks, inv_sum[g], dtype, head_dim, out, (seq * num_heads + first_head + g) * head_dim);
}

VECTOR_CLONES
static void attend_one(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table,
                       int context_len, void *out, int64_t seq, int kv_head, int num_heads, int num_kv_heads,
                       int head_dim, int block_size, float scale, int dtype, vfloat *work) {
    if (context_len <= 0) { /* a padding row: zeros, as the Triton kernel writes */
        const int group = num_heads / num_kv_heads, element = dtype == DTYPE_FLOAT32 ? 4 : 2;
        const int64_t first = (seq * num_heads + (int64_t)kv_head * group) * head_dim;
        memset((char *)out + first * element, 0, (size_t)group * head_dim * element);
        return;
    }
#define ATTEND(DTYPE, HEAD_DIM) attend_item(q, k_cache, v_cache, block_table, context_len, out, seq, kv_head, \
                                            num_heads, num_kv_heads, block_size, scale, work, DTYPE, HEAD_DIM)
    /* the common head sizes get code specialized to them; other multiples of 16 the general loops */
    if (dtype == DTYPE_BFLOAT16) {
        if (head_dim == 64) ATTEND(DTYPE_BFLOAT16, 64);
        else if (head_dim == 128) ATTEND(DTYPE_BFLOAT16, 128);
        else ATTEND(DTYPE_BFLOAT16, head_dim);
    } else {
        if (head_dim == 64) ATTEND(DTYPE_FLOAT32, 64);
        else if (head_dim == 128) ATTEND(DTYPE_FLOAT32, 128);
        else ATTEND(DTYPE_FLOAT32, head_dim);
    }
#undef ATTEND
}

/* q, out [num_seqs, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
 * block_tables [num_seqs, max_blocks_per_seq] int32; context_lens [num_seqs] int32 (0: a padding row, zero
 * output). All contiguous, of one dtype (0 fp32, 1 bf16); head_dim a multiple of 16, at most 256.
 * Returns 0; -1 when a work buffer cannot be allocated; -2 for shapes it does not take. */
int pce_cpu_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                   const int32_t *block_tables, const int32_t *context_lens, void *out,
                                   int64_t num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                   int64_t max_blocks_per_seq, float scale, int dtype) {
    if (head_dim % LANES != 0 || head_dim > MAX_HEAD_DIM || num_kv_heads < 1 || num_heads % num_kv_heads != 0
        || block_size < 1 || (dtype != DTYPE_FLOAT32 && dtype != DTYPE_BFLOAT16))
        return -2;
    const int64_t items = num_seqs * num_kv_heads;
    int max_context_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (context_lens[s] > max_context_len) max_context_len = context_lens[s];
    const size_t work_bytes = sizeof(vfloat) * work_vectors(num_heads / num_kv_heads, head_dim, max_context_len);
    int failed = 0;
#pragma omp parallel
    {
        vfloat *work = aligned_alloc(sizeof(vfloat), work_bytes);
        if (work == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < items; item++) {
            if (work == NULL) continue;
            const int64_t seq = item / num_kv_heads;
            attend_one(q, k_cache, v_cache, block_tables + seq * max_blocks_per_seq, context_lens[seq], out, seq,
                       (int)(item % num_kv_heads), num_heads, num_kv_heads, head_dim, block_size, scale, dtype, work);
        }
        free(work);
    }
    return failed ? -1 : 0;
}
