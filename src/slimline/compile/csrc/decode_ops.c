/* The small float32 operations of a one-token decode step of a Llama block, in C.
 *
 * At batch 1 these are a few thousand flops each, and through torch each costs its dispatch:
 * on the 2-core AMD EPYC here RMSNorm of 2048 values took ~41 us as torch ops, the rotary
 * embedding of the query heads ~44 us; one call each here takes ~8-9 us (ctypes included)
 * for the same arithmetic. (Attention of one query over the cache, and a whole block's step
 * with the gemv kernels: decode_block.c.)
 *
 * - slimline_rms_norm: out = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich, arXiv 1910.07467);
 * - slimline_rotate: rotary embedding (Su et al., arXiv 2104.09864), the pairs (i, i + D/2)
 *   of each head turned as Llama's rotate_half does:
 *   out[i] = x[i] cos[i] - x[i + D/2] sin[i],  out[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2];
 *
 * Sums are float32, in 8 lanes then across them: not torch's order, so results differ from
 * the torch ops in the last bits. Compiled with the gemv library's flags (slimline/compile/
 * decode_ops.py).
 */
#include <math.h>
#include <stdint.h>

static float sum_squares(const float *x, int64_t n) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += x[i + j] * x[i + j];
    float total = 0.0f;
    for (int j = 0; j < 8; j++) total += lane[j];
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

void slimline_rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    const float inv = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

void slimline_rotate(const float *x, int64_t heads, int64_t dim, const float *cos,
                     const float *sin, float *out) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        const float *r = x + h * dim;
        float *o = out + h * dim;
        for (int64_t i = 0; i < half; i++) {
            o[i] = r[i] * cos[i] - r[i + half] * sin[i];
            o[i + half] = r[i + half] * cos[i + half] + r[i] * sin[i + half];
        }
    }
}
