/* One decode step of a whole Llama block in one C call: one new token of one sequence.
 *
 * fast_decode's Python step calls every part of a block as its own operation; at batch 1 each
 * costs a torch dispatch or a module call (~10-25 us on the 2-core AMD EPYC here) for a few
 * microseconds of arithmetic, ~17 ms of a ~70 ms token on llama-1b-random (int4, int8
 * activations). Here the block's seven packed projections (the gemv kernels of slimline/
 * quantize/csrc, linked into this library), its norms, rotary embedding, the cache append,
 * attention and the SwiGLU MLP run in one call:
 *
 *   h = rms_norm(x) * w1;  q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv
 *   [Qwen3: q, k = rms_norm(q_head) * wq, rms_norm(k_head) * wk, each head of D]
 *   q, k = rope(q), rope(k);  keys[:, p] = k;  values[:, p] = v
 *   x += attention(q, keys[:, :p+1], values[:, :p+1]) Wo^T
 *   h = rms_norm(x) * w2;  x += (silu(h Wg^T) * (h Wu^T)) Wd^T
 *
 * the dense Llama block (Touvron et al., arXiv 2302.13971) with grouped-query attention
 * (Ainslie et al., arXiv 2305.13245): query head h reads key/value head h / (H / KV).
 * Attention keeps scores and softmax in float32, one task per key/value head and group of up
 * to 8 of its query heads (each key and value row read once for the group); exp is a
 * polynomial (vector_exp.h: Cephes' expf, ~1 ulp).
 * Results differ from torch's ops in the last bits (other summation orders).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#include "vector_exp.h"

/* from the gemv sources and decode_ops.c, compiled into the same library */
int slimline_gemv(const float *x, int64_t M, int64_t K, const uint8_t *qweight, int64_t N,
                  int bits, int64_t group, const void *scales, int scale_kind,
                  const uint8_t *zeros, float *xsum, float *out, int isa);
int slimline_gemv_a8(const float *x, int64_t M, int64_t K, const uint8_t *qweight, int64_t N,
                     int bits, int64_t group, const void *scales, int scale_kind,
                     const uint8_t *zeros, float *out, int isa);
void slimline_rms_norm(const float *x, const float *w, int64_t n, float eps, float *out);
void slimline_rotate(const float *x, int64_t heads, int64_t dim, const float *cos,
                     const float *sin, float *out);

/* A packed projection as QuantLinear keeps it (every field 8 bytes: one ctypes layout). */
struct slimline_linear {
    const uint8_t *qweight;
    const void *scales;
    const uint8_t *zeros; /* NULL: symmetric grid */
    const float *bias;    /* NULL: none */
    int64_t in_features, out_features, bits, group, scale_kind;
    int64_t int8_activations; /* 1: the int8-activation kernel (float32 for NaN / inf rows) */
};

struct slimline_block {
    struct slimline_linear q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm;
    double attn_eps, mlp_eps, scaling;
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    const float *q_norm, *k_norm; /* per-head RMSNorm weights (D,) of q and k; NULL: none */
    double q_eps, k_eps;
};

#define AVX2 __attribute__((target("avx2,fma")))
#define GROUP_HEADS 8 /* query heads sharing one pass over a key/value head's rows */

/* e^x for n values x <= 0, in place. */
AVX2 static void exp_in_place(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, slimline_exp_nonpositive(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(tail, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(tail, slimline_exp_nonpositive(_mm256_loadu_ps(tail)));
        memcpy(x + i, tail, (size_t)(n - i) * sizeof(float));
    }
}

/* gate[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g) (Elfwing et al., arXiv 1702.03118). */
AVX2 static void silu_times(float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = slimline_exp_nonpositive(_mm256_or_ps(g, sign)); /* e^-|g| */
        /* sigmoid(g) = 1 / (1 + e^-g): for g < 0 it is e^g / (1 + e^g) = e / (1 + e) */
        const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The lane sums of eight vectors, as one vector: lane j = sum of a[j]'s lanes. */
AVX2 static inline __m256 hsum8x8(const __m256 a[8]) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* s0123 = [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of the low and high 128-bit halves */
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

#define POSITIONS 8 /* scores of one query head computed at once */
#define CHUNK 32    /* positions whose value rows one pass over the group's heads reads */

/* scores[l] = scale * q . K[l] for l < length, K rows of D values (D a multiple of 8). */
AVX2 static void scores_avx2(const float *q, const float *K, int64_t length, int64_t D,
                             float scale, float *scores) {
    const __m256 s = _mm256_set1_ps(scale);
    int64_t l = 0;
    for (; l + POSITIONS <= length; l += POSITIONS) {
        __m256 acc[POSITIONS];
        for (int j = 0; j < POSITIONS; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            for (int j = 0; j < POSITIONS; j++)
                acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(K + (l + j) * D + d), acc[j]);
        }
        _mm256_storeu_ps(scores + l, _mm256_mul_ps(hsum8x8(acc), s));
    }
    for (; l < length; l++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(K + l * D + d), acc);
        scores[l] = hsum(acc) * scale;
    }
}

/* out (D) += sum_{l0 <= l < l1} w[l] V[l] (D a multiple of 8). */
AVX2 static void weighted_rows_avx2(const float *w, const float *V, int64_t l0, int64_t l1,
                                    int64_t D, float *out) {
    for (int64_t d = 0; d < D; d += 8) {
        __m256 acc = _mm256_loadu_ps(out + d);
        for (int64_t l = l0; l < l1; l++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[l]), _mm256_loadu_ps(V + l * D + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
}

/* The softmax of n scores, in place: e^(s - max) / sum. */
static void softmax(float *s, int64_t n) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t l = 0; l < n; l++) top = s[l] > top ? s[l] : top;
    for (int64_t l = 0; l < n; l++) s[l] -= top;
    exp_in_place(s, n);
    for (int64_t l = 0; l < n; l++) total += s[l];
    const float inv = 1.0f / total;
    for (int64_t l = 0; l < n; l++) s[l] *= inv;
}

/* Softmax attention of one query per head over `length` cached positions. q, out: (H, D);
 * keys, values: (KV, room, D), positions 0..length-1 filled; scores: (H, length) scratch.
 * D a multiple of 8 takes the vector loops; any other D, plain loops. */
AVX2 void slimline_attend(const float *q, const float *keys, const float *values, int64_t length,
                          int64_t room, int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                          float *scores, float *out) {
    const int64_t group = heads / kv_heads;
    const int64_t parts = (group + GROUP_HEADS - 1) / GROUP_HEADS, tasks = kv_heads * parts;
    const int vector = dim % 8 == 0;
#pragma omp parallel for schedule(static) if (tasks > 1 && length * group * dim >= 4096)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t kv = task / parts, h0 = kv * group + (task % parts) * GROUP_HEADS;
        const int64_t h1 = h0 + GROUP_HEADS < (kv + 1) * group ? h0 + GROUP_HEADS : (kv + 1) * group;
        const float *K = keys + kv * room * dim, *V = values + kv * room * dim;
        for (int64_t l0 = 0; l0 < length; l0 += CHUNK) { /* key rows in L1 across heads */
            const int64_t l1 = l0 + CHUNK < length ? l0 + CHUNK : length;
            for (int64_t h = h0; h < h1; h++) {
                float *s = scores + h * length;
                if (vector) scores_avx2(q + h * dim, K + l0 * dim, l1 - l0, dim, scale, s + l0);
                else
                    for (int64_t l = l0; l < l1; l++) {
                        float total = 0.0f;
                        for (int64_t d = 0; d < dim; d++) total += q[h * dim + d] * K[l * dim + d];
                        s[l] = total * scale;
                    }
            }
        }
        for (int64_t h = h0; h < h1; h++) {
            softmax(scores + h * length, length);
            memset(out + h * dim, 0, (size_t)dim * sizeof(float));
        }
        for (int64_t l0 = 0; l0 < length; l0 += CHUNK) { /* value rows in L1 across heads */
            const int64_t l1 = l0 + CHUNK < length ? l0 + CHUNK : length;
            for (int64_t h = h0; h < h1; h++) {
                if (vector) weighted_rows_avx2(scores + h * length, V, l0, l1, dim, out + h * dim);
                else
                    for (int64_t l = l0; l < l1; l++)
                        for (int64_t d = 0; d < dim; d++)
                            out[h * dim + d] += scores[h * length + l] * V[l * dim + d];
            }
        }
    }
}

/* out = x W^T (+ bias) for one row x; xsum: scratch of in_features / group + 1 floats. */
static int linear(const struct slimline_linear *L, const float *x, float *out, float *xsum) {
    int status = 1;
    if (L->int8_activations)
        status = slimline_gemv_a8(x, 1, L->in_features, L->qweight, L->out_features,
                                  (int)L->bits, L->group, L->scales, (int)L->scale_kind,
                                  L->zeros, out, 0);
    if (status == 1) /* no int8 kernel, or NaN / inf in x, which the float32 kernel carries */
        status = slimline_gemv(x, 1, L->in_features, L->qweight, L->out_features, (int)L->bits,
                               L->group, L->scales, (int)L->scale_kind, L->zeros, xsum, out, 0);
    if (status != 0) return -1;
    if (L->bias)
        for (int64_t n = 0; n < L->out_features; n++) out[n] += L->bias[n];
    return 0;
}

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* One decode step of block B at position `position` (the cached length before it): x (hidden)
 * is updated in place; the new key and value are written at `position` of keys / values
 * (KV, room, D), room > position; cos / sin: D values of this position. Returns 0, or -1
 * when a kernel refused its arguments or memory ran out (x may then be partly updated: the
 * caller checks the arguments first). */
int slimline_decode_block(const struct slimline_block *B, float *x, float *keys, float *values,
                          int64_t position, int64_t room, const float *cos, const float *sin) {
    const int64_t H = B->heads, KV = B->kv_heads, D = B->head_dim, length = position + 1;
    const int64_t attn = H * D > B->hidden ? H * D : B->hidden;
    const int64_t wide = B->intermediate > attn ? B->intermediate : attn;
    /* h, q, q rotated, k, v, attention out, projection out, gate, up, xsum, scores */
    const int64_t total = B->hidden + 3 * attn + 2 * KV * D + wide + 2 * B->intermediate
                          + wide + H * length;
    float *buffer = malloc((size_t)total * sizeof(float));
    if (!buffer) return -1;
    float *h = buffer, *q = h + B->hidden, *qr = q + attn, *k = qr + attn, *v = k + KV * D;
    float *att = v + KV * D, *proj = att + attn, *gate = proj + wide;
    float *up = gate + B->intermediate, *xsum = up + B->intermediate, *scores = xsum + wide;
    int status = 0;

    slimline_rms_norm(x, B->attn_norm, B->hidden, (float)B->attn_eps, h);
    status |= linear(&B->q, h, q, xsum);
    status |= linear(&B->k, h, k, xsum);
    status |= linear(&B->v, h, v, xsum);
    if (status) goto done;
    for (int64_t j = 0; B->q_norm && j < H; j++)
        slimline_rms_norm(q + j * D, B->q_norm, D, (float)B->q_eps, q + j * D);
    for (int64_t j = 0; B->k_norm && j < KV; j++)
        slimline_rms_norm(k + j * D, B->k_norm, D, (float)B->k_eps, k + j * D);
    slimline_rotate(q, H, D, cos, sin, qr);
    for (int64_t j = 0; j < KV; j++) {
        slimline_rotate(k + j * D, 1, D, cos, sin, keys + (j * room + position) * D);
        memcpy(values + (j * room + position) * D, v + j * D, (size_t)D * sizeof(float));
    }
    slimline_attend(qr, keys, values, length, room, H, KV, D, (float)B->scaling, scores, att);
    status |= linear(&B->o, att, proj, xsum);
    if (status) goto done;
    add(x, proj, B->hidden);

    slimline_rms_norm(x, B->mlp_norm, B->hidden, (float)B->mlp_eps, h);
    status |= linear(&B->gate, h, gate, xsum);
    status |= linear(&B->up, h, up, xsum);
    if (status) goto done;
    silu_times(gate, up, B->intermediate);
    status |= linear(&B->down, gate, proj, xsum);
    if (status) goto done;
    add(x, proj, B->hidden);
done:
    free(buffer);
    return status ? -1 : 0;
}
