/* The log-sum-exp side of teacher-forced scoring on the CPU: per row of an LM head's logits, taken a tile of
 * the vocabulary at a time (kernels/cpu_logprob.py multiplies each tile with oneDNN), the running max, the sum of
 * exp(logit - max) (an online log-sum-exp), the first argmax and the target's logit. The CPU counterpart of
 * the Triton kernel's loop over vocabulary tiles in kernels/fused_logprob.py.
 *
 * Why by hand: over a whole row of logits torch makes four passes (max, subtract, exp, sum), each through
 * memory when a chunk of rows' logits outgrows the caches. Here a tile small enough to stay in cache is read
 * twice (its max, then its exps) right after its product wrote it.
 */
#include "vector.h"

/* One row's tile: see pce_cpu_logprob_tile. */
VECTOR_CLONES
static void update_row(const float *row, int64_t width, int64_t v0, int64_t target, float *max, float *sum,
                       int64_t *argmax, float *target_logit) {
    const int64_t vectors = width / LANES;
    /* the tile's max, lane-wise, then the first id holding it */
    vfloat m = broadcast(-__builtin_inff());
    for (int64_t i = 0; i < vectors; i++) {
        const vfloat x = load_lanes(row, LANES * i, DTYPE_FLOAT32);
        m = select_lanes(x > m, x, m);
    }
    float tile_max = max_of_lanes(m);
    for (int64_t i = LANES * vectors; i < width; i++)
        if (row[i] > tile_max) tile_max = row[i];
    int64_t first = 0;
    while (first < width - 1 && row[first] != tile_max) first++; /* NaN logits are never the max */

    const float new_max = tile_max > *max ? tile_max : *max;
    vfloat s = broadcast(0.0f);
    for (int64_t i = 0; i < vectors; i++) s += exp_nonpositive(load_lanes(row, LANES * i, DTYPE_FLOAT32) - new_max);
    float tile_sum = sum_of_lanes(s);
    for (int64_t i = LANES * vectors; i < width; i++) tile_sum += exp_nonpositive(broadcast(row[i] - new_max))[0];
    /* a row's first tile starts from max -inf and sum 0: exp(-inf) is 0 */
    *sum = *sum * exp_nonpositive(broadcast(*max - new_max))[0] + tile_sum;
    if (*argmax < 0 || tile_max > *max) *argmax = v0 + first;
    *max = new_max;
    if (target >= v0 && target < v0 + width) *target_logit = row[target - v0];
}

/* logits [rows, width] fp32, row stride ld, for vocabulary ids v0 .. v0 + width - 1; targets [rows] int64 (any
 * value: only ids in the tile are read). Updates max (-inf before any tile), sum (0), argmax (-1) and
 * target_logit per row. An argmax only moves on a strictly larger logit, so ties keep the lowest id, as
 * torch.argmax. Returns 0. */
int pce_cpu_logprob_tile(const float *logits, int64_t rows, int64_t width, int64_t ld, int64_t v0,
                         const int64_t *targets, float *max, float *sum, int64_t *argmax, float *target_logit) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        update_row(logits + r * ld, width, v0, targets[r], max + r, sum + r, argmax + r, target_logit + r);
    return 0;
}
