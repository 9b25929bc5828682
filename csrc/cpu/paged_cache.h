/* Addressing the paged KV cache [num_blocks, block_size, num_kv_heads, head_dim] through a block table,
 * shared by the attention kernels. */
#ifndef PCE_CPU_PAGED_CACHE_H
#define PCE_CPU_PAGED_CACHE_H

#include "vector.h"

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

#endif
