/* Softmax attention over sequences of different lengths, on the CPU.
 *
 * Each sequence b has its queries in rows ranges[b] = {q_start, m, k_start, n}: queries
 * q_start .. q_start+m-1 of q, keys and values k_start .. k_start+n-1 of k and v. Two callers:
 * - packed (the unpad step, after ByteTransformer, arXiv 2210.03052): a padded batch's real
 *   tokens in one (T, H*D) matrix per projection, q_start = k_start, m = n;
 * - padded (compile's attention for encoders): the (B*L, H*D) padded rows, all L queries of
 *   a row over its n real keys (one run of the key-padding mask), as the masked attention of
 *   the padded model computes them.
 * Each (sequence, head) attends over its own keys only,
 *
 *     out[i] = sum_j softmax_j(scale * q_i . k_j) v_j        (j among the sequence's keys),
 *
 * so no padded key is ever multiplied or masked: the work is sum_b m_b n_b, not
 * batch * length^2. One task per (sequence, head), shared among the OpenMP threads (the libgomp
 * torch has loaded, so its thread count). A task copies its keys transposed, (D, n), computes
 * the scores of four queries by sixteen keys at a time (eight independent FMA chains), takes
 * each row's softmax (maximum off, a vectorised exp: vector_exp.h), and sums the value rows
 * weighted by the probabilities for two queries at a time (eight accumulators, written out
 * rather than looped: a loop over an array of them ran 1.2-1.3x slower), scaled by 1 / sum
 * once at the end.
 *
 * Rows are float32 or bfloat16 (kind 0 / 1: read into float32, the output rounded to nearest
 * even), any row stride; all arithmetic is float32. Sums run in another order than torch's
 * matmuls, so results differ from them in the last bits. Compiled with the gemv library's flags
 * (AVX2 + FMA, OpenMP; slimline/compile/varlen_attention.py).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_exp.h"

static inline float read_value(const void *base, int64_t index, int kind) {
    if (kind == 0) return ((const float *)base)[index];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Eight consecutive values as float32 (bfloat16: the 16 bits moved up into a float32's top). */
static inline __m256 load8(const void *base, int64_t index, int kind) {
    if (kind == 0) return _mm256_loadu_ps((const float *)base + index);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline void write_value(void *base, int64_t index, int kind, float value) {
    if (kind == 0) {
        ((float *)base)[index] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        bits |= 0x00400000u; /* NaN stays a (quiet) NaN */
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    }
    ((uint16_t *)base)[index] = (uint16_t)(bits >> 16);
}

/* Eight float32 values stored as float32 or (rounded) bfloat16. */
static inline void store8(void *base, int64_t index, int kind, __m256 values) {
    if (kind == 0) {
        _mm256_storeu_ps((float *)base + index, values);
        return;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, values);
    for (int l = 0; l < 8; l++) write_value(base, index + l, kind, lanes[l]);
}

/* One (sequence, head): query rows [q_start, q_start + m) of q, key and value rows
 * [k_start, k_start + n) of k and v (n >= 1), at column offset col, dim a multiple of 8.
 * scratch: SCRATCH_FLOATS(m, n rounded up to 8, dim) floats. Scores are computed for four
 * queries at a time and sixteen keys at a time (eight independent accumulators: the FMA
 * chains overlap), the output for two queries at a time over 32 dims. */
#define SCRATCH_FLOATS(m, padded, dim) \
    ((size_t)((dim) * (padded) + ((m) + 4) * (padded) + 4 * (dim) + (m) + 1))

static void attend_head(const void *q, const void *k, const void *v, int64_t q_stride,
                        int64_t k_stride, int64_t v_stride, int64_t q_start, int64_t m,
                        int64_t k_start, int64_t n, int64_t col, int64_t dim, float scale,
                        int kind, void *out, int64_t out_stride, float *scratch) {
    const int64_t padded = (n + 7) & ~(int64_t)7;
    float *keys = scratch;                          /* (dim, padded): the keys transposed */
    float *scores = keys + dim * padded;            /* (m rounded up to 4, padded) */
    float *query = scores + (m + 4) * padded;       /* (4, dim): four scaled queries */
    float *inverse = query + 4 * dim;               /* (m): 1 / each row's sum */
    for (int64_t j = 0; j < n; j++)
        for (int64_t d = 0; d < dim; d++)
            keys[d * padded + j] = read_value(k, (k_start + j) * k_stride + col + d, kind);
    for (int64_t d = 0; d < dim; d++)
        for (int64_t j = n; j < padded; j++) keys[d * padded + j] = 0.0f;
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
        for (int64_t r = 0; r < 4; r++)
            for (int64_t d = 0; d < dim; d++)
                query[r * dim + d] = i0 + r < m
                    ? scale * read_value(q, (q_start + i0 + r) * q_stride + col + d, kind) : 0.0f;
        float *row = scores + i0 * padded;
        int64_t j = 0;
        for (; j + 16 <= padded; j += 16) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            __m256 c0 = a0, c1 = a0, e0 = a0, e1 = a0;
            for (int64_t d = 0; d < dim; d++) {
                const __m256 k0 = _mm256_loadu_ps(keys + d * padded + j);
                const __m256 k1 = _mm256_loadu_ps(keys + d * padded + j + 8);
                const __m256 qa = _mm256_broadcast_ss(query + d);
                const __m256 qb = _mm256_broadcast_ss(query + dim + d);
                const __m256 qc = _mm256_broadcast_ss(query + 2 * dim + d);
                const __m256 qe = _mm256_broadcast_ss(query + 3 * dim + d);
                a0 = _mm256_fmadd_ps(qa, k0, a0);
                a1 = _mm256_fmadd_ps(qa, k1, a1);
                b0 = _mm256_fmadd_ps(qb, k0, b0);
                b1 = _mm256_fmadd_ps(qb, k1, b1);
                c0 = _mm256_fmadd_ps(qc, k0, c0);
                c1 = _mm256_fmadd_ps(qc, k1, c1);
                e0 = _mm256_fmadd_ps(qe, k0, e0);
                e1 = _mm256_fmadd_ps(qe, k1, e1);
            }
            _mm256_storeu_ps(row + j, a0);
            _mm256_storeu_ps(row + j + 8, a1);
            _mm256_storeu_ps(row + padded + j, b0);
            _mm256_storeu_ps(row + padded + j + 8, b1);
            _mm256_storeu_ps(row + 2 * padded + j, c0);
            _mm256_storeu_ps(row + 2 * padded + j + 8, c1);
            _mm256_storeu_ps(row + 3 * padded + j, e0);
            _mm256_storeu_ps(row + 3 * padded + j + 8, e1);
        }
        if (j < padded) { /* the last eight keys */
            __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, e0 = a0;
            for (int64_t d = 0; d < dim; d++) {
                const __m256 k0 = _mm256_loadu_ps(keys + d * padded + j);
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(query + d), k0, a0);
                b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(query + dim + d), k0, b0);
                c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(query + 2 * dim + d), k0, c0);
                e0 = _mm256_fmadd_ps(_mm256_broadcast_ss(query + 3 * dim + d), k0, e0);
            }
            _mm256_storeu_ps(row + j, a0);
            _mm256_storeu_ps(row + padded + j, b0);
            _mm256_storeu_ps(row + 2 * padded + j, c0);
            _mm256_storeu_ps(row + 3 * padded + j, e0);
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 live = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - (padded - 8))), lane));
    for (int64_t i = 0; i < m; i++) { /* each row's softmax, less its 1 / sum */
        float *row = scores + i * padded;
        float top = row[0];
        for (int64_t j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
        const __m256 shift = _mm256_set1_ps(top);
        __m256 total = _mm256_setzero_ps();
        for (int64_t j = 0; j < padded; j += 8) {
            __m256 p = slimline_exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
            if (j + 8 == padded) p = _mm256_and_ps(p, live); /* lanes past n are not keys */
            _mm256_storeu_ps(row + j, p);
            total = _mm256_add_ps(total, p);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, total);
        float sum = 0.0f;
        for (int l = 0; l < 8; l++) sum += lanes[l];
        inverse[i] = 1.0f / sum;
    }
    for (int64_t i0 = 0; i0 < m; i0 += 2) { /* out = P V / sum, two rows at a time */
        const int64_t pair = i0 + 1 < m;
        const float *pa = scores + i0 * padded, *pb = pair ? pa + padded : pa;
        for (int64_t d0 = 0; d0 < dim; d0 += 32) {
            const int64_t width = dim - d0 < 32 ? dim - d0 : 32;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t t = 0; t < n; t++) {
                const int64_t at = (k_start + t) * v_stride + col + d0;
                const __m256 x = _mm256_broadcast_ss(pa + t), y = _mm256_broadcast_ss(pb + t);
                const __m256 v0 = load8(v, at, kind);
                a0 = _mm256_fmadd_ps(x, v0, a0);
                b0 = _mm256_fmadd_ps(y, v0, b0);
                if (width > 8) {
                    const __m256 v1 = load8(v, at + 8, kind);
                    a1 = _mm256_fmadd_ps(x, v1, a1);
                    b1 = _mm256_fmadd_ps(y, v1, b1);
                }
                if (width > 16) {
                    const __m256 v2 = load8(v, at + 16, kind);
                    a2 = _mm256_fmadd_ps(x, v2, a2);
                    b2 = _mm256_fmadd_ps(y, v2, b2);
                }
                if (width > 24) {
                    const __m256 v3 = load8(v, at + 24, kind);
                    a3 = _mm256_fmadd_ps(x, v3, a3);
                    b3 = _mm256_fmadd_ps(y, v3, b3);
                }
            }
            const __m256 ia = _mm256_set1_ps(inverse[i0]);
            const __m256 ib = _mm256_set1_ps(inverse[i0 + pair]);
            const __m256 rows[2][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}};
            for (int64_t r = 0; r <= pair; r++)
                for (int64_t c = 0; c < width / 8; c++)
                    store8(out, (q_start + i0 + r) * out_stride + col + d0 + 8 * c, kind,
                           _mm256_mul_ps(rows[r][c], r ? ib : ia));
        }
    }
}

/* ranges: (batch, 4) int64 rows {q_start, m, k_start, n}; a sequence with m == 0 or n == 0 is
 * skipped (its output rows are left as they were). Returns 0, or 1 when scratch memory could
 * not be had (out is then incomplete). */
int slimline_varlen_attention(const void *q, const void *k, const void *v, int64_t q_stride,
                              int64_t k_stride, int64_t v_stride, const int64_t *ranges,
                              int64_t batch, int64_t heads, int64_t dim, float scale, int kind,
                              void *out, int64_t out_stride) {
    int64_t most_queries = 0, most_keys = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (ranges[4 * b + 1] > most_queries) most_queries = ranges[4 * b + 1];
        if (ranges[4 * b + 3] > most_keys) most_keys = ranges[4 * b + 3];
    }
    const int64_t padded = (most_keys + 7) & ~(int64_t)7;
    const size_t floats = SCRATCH_FLOATS(most_queries, padded, dim);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scratch = malloc(floats * sizeof(float));
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < batch * heads; task++) {
            const int64_t b = task / heads, h = task % heads;
            const int64_t *range = ranges + 4 * b;
            if (scratch == NULL)
                failed = 1;
            else if (range[1] > 0 && range[3] > 0)
                attend_head(q, k, v, q_stride, k_stride, v_stride, range[0], range[1], range[2],
                            range[3], h * dim, dim, scale, kind, out, out_stride, scratch);
        }
        free(scratch);
    }
    return failed;
}

/* The ranges {q_start, m, k_start, n} of a padded batch under a key-padding mask (batch,
 * length), one byte a position, nonzero where real: row b's length queries at rows b · length
 * on, over its real keys, which must form one run. Returns the count of real keys, or -1
 * (ranges then unset) when some row has none or its real keys are not one run: the mask the
 * kernel does not take. One pass over the mask; computing the same with torch's ops took ~13
 * dispatches, ~0.1 ms a layer on minilm's batch of 32 x 46 (1 thread, the 2-core EPYC here). */
int64_t slimline_key_runs(const uint8_t *mask, int64_t batch, int64_t length, int64_t *ranges) {
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) {
        const uint8_t *row = mask + b * length;
        int64_t first = 0;
        while (first < length && !row[first]) first++;
        int64_t end = first;
        while (end < length && row[end]) end++;
        if (end == first) return -1;
        for (int64_t l = end; l < length; l++)
            if (row[l]) return -1;
        int64_t *range = ranges + 4 * b;
        range[0] = b * length;
        range[1] = length;
        range[2] = b * length + first;
        range[3] = end - first;
        total += end - first;
    }
    return total;
}
