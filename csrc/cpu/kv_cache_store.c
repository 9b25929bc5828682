/* One step's keys and values into the paged KV cache on CPU: one copy per token and cache, where torch's
 * advanced-indexing store costs several ops per layer. The layout and the contract of kernels/kv_cache_store.py
 * (its torch path is the reference): token t goes to slot slot_mapping[t] (block * block_size + offset) of
 * caches [num_blocks, block_size, num_kv_heads, head_dim], contiguous; a negative slot stores nothing. */
#include <stdint.h>
#include <string.h>

/* key and value rows of `row_elements` contiguous elements, `key_stride` / `value_stride` elements apart */
int pce_cpu_store_kvcache(const void *key, const void *value, void *k_cache, void *v_cache,
                          const int64_t *slot_mapping, int64_t tokens, int64_t row_elements, int64_t key_stride,
                          int64_t value_stride, int element_size) {
    const size_t row_bytes = (size_t)row_elements * element_size;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy((char *)k_cache + slot * row_bytes, (const char *)key + t * key_stride * element_size, row_bytes);
        memcpy((char *)v_cache + slot * row_bytes, (const char *)value + t * value_stride * element_size, row_bytes);
    }
    return 0;
}
