/* What the attention kernels share: the shapes they take, addressing the paged KV cache [num_blocks, block_size,
 * num_kv_heads, head_dim] through a block table, and their dispatch to code specialized by dtype and head size. */
#ifndef PCE_CPU_PAGED_CACHE_H
#define PCE_CPU_PAGED_CACHE_H

#include "vector.h"

enum { MAX_HEAD_DIM = 256 };

/* fp32 or bf16; head_dim a multiple of 16 up to MAX_HEAD_DIM; query heads in whole groups per KV head */
VECTOR_INLINE int attention_shapes_taken(int num_heads, int num_kv_heads, int head_dim, int block_size, int dtype) {
    return head_dim % LANES == 0 && head_dim <= MAX_HEAD_DIM && num_kv_heads >= 1 && num_heads % num_kv_heads == 0
        && block_size >= 1 && (dtype == DTYPE_FLOAT32 || dtype == DTYPE_BFLOAT16);
}

/* The cache rows (every KV head), in elements, of tokens t0 .. t0 + n - 1 of a sequence: one division for
 * the run, then steps through the block table (block_size is not a constant: each division is an idiv). */
VECTOR_INLINE void token_rows(const int32_t *block_table, int t0, int n, int block_size, int64_t token_stride,
                              int64_t *rows) {
    int block = t0 / block_size, offset = t0 % block_size;
    for (int i = 0; i < n; i++) {
        rows[i] = ((int64_t)block_table[block] * block_size + offset) * token_stride;
        if (++offset == block_size) offset = 0, block++;
    }
}

/* ATTEND(DTYPE, HEAD_DIM) with both constant where they are common (fp32 or bf16, head sizes 64 and 128): each
 * combination inlines to straight-line vector code; other multiples of 16 take the general loops. */
#define DISPATCH_DTYPE_AND_HEAD_DIM(ATTEND, dtype, head_dim)         \
    do {                                                             \
        if ((dtype) == DTYPE_BFLOAT16) {                             \
            if ((head_dim) == 64) ATTEND(DTYPE_BFLOAT16, 64);        \
            else if ((head_dim) == 128) ATTEND(DTYPE_BFLOAT16, 128); \
            else ATTEND(DTYPE_BFLOAT16, head_dim);                   \
        } else {                                                     \
            if ((head_dim) == 64) ATTEND(DTYPE_FLOAT32, 64);         \
            else if ((head_dim) == 128) ATTEND(DTYPE_FLOAT32, 128);  \
            else ATTEND(DTYPE_FLOAT32, head_dim);                    \
        }                                                            \
    } while (0)

#endif
