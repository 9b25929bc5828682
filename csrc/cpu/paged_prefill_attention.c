/* Paged prefill attention on the CPU: several sequences' new tokens, causally, over their whole context in
 * the paged KV cache (a cached prefix and the new tokens' own keys and values, already stored). The CPU
 * counterpart of flash-attn's varlen call with a block table, with the torch reference
 * `paged_prefill_attention_torch` (kernels/paged_attention.py).
 *
 * Why by hand: through torch the new tokens are padded to the longest, the context gathered out of the
 * blocks into a padded copy, and one masked product made over the padded rectangle; at the scoring shapes
 * (a few hundred new tokens after a cached prompt) that runs at a quarter of the cores' fp32 rate.
 *
 * Here a work item is 16 query rows of one sequence and KV head: the (token, query head) pairs of that KV
 * head's group, in order, so one block of 16 holds a few tokens' heads. Its queries are held transposed (a
 * row in each lane), so the scores of a tile of 16 keys are 16 vectors of products with each key's
 * dimensions broadcast, no lane sums; the softmax is online over the key tiles (rows in lanes: the running
 * max and sum are plain vector ops), and the values are accumulated with dimensions in lanes, each weight
 * broadcast. A tile's keys and values (bf16 widened) are copied into a buffer that stays in L1, so both
 * products address them at a constant stride. Causal masking touches only the tiles past the block's first
 * token. All arithmetic is fp32; the output is rounded once to the cache's dtype.
 *
 * Threads: OpenMP on torch's libgomp (see paged_attention.c), items scheduled dynamically; a sequence's
 * blocks run from its last (the most keys) to its first, so the long items start early and the ones that
 * follow read the same keys from cache.
 */
#include "paged_cache.h"

enum { ROWS = LANES, KEYS = 16 };

/* Per-thread buffers, in vectors: the block's queries transposed, its output rows, a tile of keys and one of
 * values in fp32, the tile's softmax weights. */
static int64_t prefill_work_vectors(int head_dim) {
    const int chunks = head_dim / LANES;
    return head_dim + (int64_t)ROWS * chunks + 2 * (int64_t)KEYS * chunks + KEYS;
}

/* tokens t0 .. t0 + n - 1 of KV head g into tile[i] (chunks vectors each) as fp32; past n, copies of the
 * first (finite, masked) */
VECTOR_INLINE void load_head_tile(const void *cache, const int64_t *rows, int n, int g, int dtype, int head_dim,
                                  vfloat *tile) {
    const int chunks = head_dim / LANES;
    for (int i = 0; i < KEYS; i++) {
        const int64_t at = rows[i < n ? i : 0] + (int64_t)g * head_dim;
        for (int c = 0; c < chunks; c++) tile[i * chunks + c] = load_lanes(cache, at + LANES * c, dtype);
    }
}

/* Rows r0 .. r0 + 15 (fewer at the end) of sequence `seq`'s rows for KV head g: row r is new token r / group,
 * query head g * group + r % group. Inlined with a constant dtype and head_dim. */
VECTOR_INLINE void attend_row_block(
        const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table, int context_len,
        int q_len, int64_t q_start, void *out, int g, int r0, int num_heads, int num_kv_heads, int block_size,
        float scale, vfloat *work, const int dtype, const int head_dim) {
    const int group = num_heads / num_kv_heads, chunks = head_dim / LANES;
    /* rows accumulated together in the weighted sum of values: each value vector loaded once for all */
    enum { ACCUMULATORS = 16 };
    int together = 1; /* a power of two, so that it divides ROWS */
    while (2 * together * chunks <= ACCUMULATORS) together *= 2;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int nrows = q_len * group - r0 < ROWS ? q_len * group - r0 : ROWS;
    vfloat *qt = work, *acc = qt + head_dim, *keys = acc + ROWS * chunks, *values = keys + KEYS * chunks;
    vfloat *weights = values + KEYS * chunks;
    const int first = context_len - q_len; /* the position of the first new token */

    /* lane r: row r's query, scaled, one vector per dimension; lanes past the block copy its last row */
    float *qf = (float *)qt;
    vfloat position;
    for (int r = 0; r < ROWS; r++) {
        const int row = r0 + (r < nrows ? r : nrows - 1), token = row / group;
        const int64_t offset = ((q_start + token) * num_heads + g * group + row % group) * head_dim;
        for (int d = 0; d < head_dim; d++) qf[d * LANES + r] = load_element(q, offset + d, dtype) * scale;
        position[r] = (float)(first + token); /* exact: positions are far below 2^24 */
    }
    for (int c = 0; c < ROWS * chunks; c++) acc[c] = broadcast(0.0f);

    const int lowest = first + r0 / group, last = first + (r0 + nrows - 1) / group;
    /* -inf at the start: exp(-inf - m) is 0, and every row sees key 0, so the max is finite after tile 0 */
    vfloat max = broadcast(-__builtin_inff()), sum = broadcast(0.0f);
    for (int t0 = 0; t0 <= last; t0 += KEYS) {
        const int n = last + 1 - t0 < KEYS ? last + 1 - t0 : KEYS;
        int64_t rows[KEYS];
        token_rows(block_table, t0, n, block_size, token_stride, rows);
        load_head_tile(k_cache, rows, n, g, dtype, head_dim, keys);

        const float *kf = (const float *)keys;
        vfloat s[KEYS];
        for (int i = 0; i < KEYS; i++) s[i] = broadcast(0.0f);
        for (int d = 0; d < head_dim; d++) {
            const vfloat qd = qt[d];
            for (int i = 0; i < KEYS; i++) s[i] += qd * kf[i * head_dim + d];
        }
        if (t0 + KEYS - 1 > lowest) /* keys past some row's own position, or past the context */
            for (int i = 0; i < KEYS; i++)
                s[i] = select_lanes(position >= (float)(t0 + i), s[i], broadcast(-__builtin_inff()));

        vfloat tile_max = s[0];
        for (int i = 1; i < KEYS; i++) tile_max = select_lanes(s[i] > tile_max, s[i], tile_max);
        const vfloat new_max = select_lanes(tile_max > max, tile_max, max);
        const vfloat rescale = exp_nonpositive(max - new_max);
        vfloat tile_sum = broadcast(0.0f);
        for (int i = 0; i < KEYS; i++) {
            weights[i] = exp_nonpositive(s[i] - new_max);
            tile_sum += weights[i];
        }
        sum = sum * rescale + tile_sum;
        max = new_max;

        load_head_tile(v_cache, rows, n, g, dtype, head_dim, values);
        const float *wf = (const float *)weights;
        for (int r = 0; r < ROWS; r += together) {
            vfloat a[ACCUMULATORS];
            for (int j = 0; j < together; j++)
                for (int c = 0; c < chunks; c++) a[j * chunks + c] = acc[(r + j) * chunks + c] * rescale[r + j];
            for (int i = 0; i < n; i++)
                for (int c = 0; c < chunks; c++) {
                    const vfloat value = values[i * chunks + c];
                    for (int j = 0; j < together; j++) a[j * chunks + c] += wf[i * LANES + r + j] * value;
                }
            for (int j = 0; j < together; j++)
                for (int c = 0; c < chunks; c++) acc[(r + j) * chunks + c] = a[j * chunks + c];
        }
    }

    for (int r = 0; r < nrows; r++) {
        const int row = r0 + r;
        const int64_t offset = ((q_start + row / group) * num_heads + g * group + row % group) * head_dim;
        const float inverse = 1.0f / sum[r];
        for (int c = 0; c < chunks; c++) store_lanes(out, offset + LANES * c, acc[r * chunks + c] * inverse, dtype);
    }
}

VECTOR_CLONES
static void attend_prefill_block(const void *q, const void *k_cache, const void *v_cache,
                                 const int32_t *block_table, int context_len, int q_len, int64_t q_start, void *out,
                                 int g, int r0, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                 float scale, int dtype, vfloat *work) {
#define ATTEND(DTYPE, HEAD_DIM) attend_row_block(q, k_cache, v_cache, block_table, context_len, q_len, q_start, out, \
                                                 g, r0, num_heads, num_kv_heads, block_size, scale, work, DTYPE, HEAD_DIM)
    DISPATCH_DTYPE_AND_HEAD_DIM(ATTEND, dtype, head_dim);
#undef ATTEND
}

/* q, out [T, num_heads, head_dim], sequence b's new tokens in rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1,
 * the last of its context_lens[b] tokens; k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
 * block_tables [num_seqs, max_blocks_per_seq] int32. All contiguous, of one dtype (0 fp32, 1 bf16); head_dim
 * a multiple of 16, at most 256. Returns 0; -1 when a buffer cannot be allocated; -2 for shapes or lengths
 * it does not take. */
int pce_cpu_paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache,
                                    const int32_t *block_tables, const int32_t *context_lens,
                                    const int32_t *cu_seqlens_q, void *out, int64_t num_seqs, int num_heads,
                                    int num_kv_heads, int head_dim, int block_size, int64_t max_blocks_per_seq,
                                    float scale, int dtype) {
    if (!attention_shapes_taken(num_heads, num_kv_heads, head_dim, block_size, dtype)) return -2;
    const int group = num_heads / num_kv_heads;
    int64_t items = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
        if (q_len < 0 || q_len > context_lens[s]) return -2;
        items += (int64_t)num_kv_heads * ((q_len * group + ROWS - 1) / ROWS);
    }
    int32_t (*item)[3] = malloc(sizeof *item * (items ? items : 1)); /* sequence, KV head, first row */
    if (item == NULL) return -1;
    int64_t next = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int blocks = ((cu_seqlens_q[s + 1] - cu_seqlens_q[s]) * group + ROWS - 1) / ROWS;
        for (int g = 0; g < num_kv_heads; g++)
            for (int b = blocks - 1; b >= 0; b--) {
                item[next][0] = (int32_t)s, item[next][1] = g, item[next][2] = b * ROWS;
                next++;
            }
    }
    const size_t work_bytes = sizeof(vfloat) * prefill_work_vectors(head_dim);
    int failed = 0;
#pragma omp parallel
    {
        vfloat *work = thread_buffer(work_bytes, &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            if (work == NULL) continue;
            const int s = item[i][0];
            attend_prefill_block(q, k_cache, v_cache, block_tables + s * max_blocks_per_seq, context_lens[s],
                                 cu_seqlens_q[s + 1] - cu_seqlens_q[s], cu_seqlens_q[s], out, item[i][1], item[i][2],
                                 num_heads, num_kv_heads, head_dim, block_size, scale, dtype, work);
        }
        free(work);
    }
    free(item);
    return failed ? -1 : 0;
}
