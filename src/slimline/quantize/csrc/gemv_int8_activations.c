/* Weight-only int4/int8 matrix-vector products with int8 activations, in integers.
 *
 * y[m, n] = sum_g s[n, g] * sum_{b in g} xs[m, b] * sum_{k in b} (u[n, k] - z[n, g]) * xq[m, k]
 *
 * x is rounded to int8 in blocks of 32 columns, each with its own scale, as llama.cpp rounds
 * the activations its Q4_0 / Q8_0 dot products take (ggml's Q8_0 of x):
 *   xs[m, b] = max_{k in b} |x[m, k]| / 127,
 *   xq[m, k] = round_half_even(x[m, k] * (127 / max_{k in b} |x[m, k]|)).
 * The weights are slimline's packing, as gemv_weight_only.c reads it (u: the stored codes, a
 * dense little-endian bit stream, row-major (N, K); s: (N, G) float32/float16/bfloat16 scales;
 * z: (N, G) uint8 zero points, or NULL for the symmetric grid, z = 2^(bits-1)). Groups of
 * `group` columns, a multiple of 32 (or one group a row), K a multiple of 32.
 *
 * Why: float32 maths needs a conversion and a fused multiply-add per weight; integer dot
 * products take 4 (AVX-512 VNNI: vpdpbusd) or 2 (AVX2: vpmaddubsw) weight-activation
 * products per 32-bit lane and instruction, so the decode of a 4-bit layer stops being bound
 * by arithmetic and becomes bound by the bytes it reads.
 *
 * Exactness: the products of a block are summed in int32 lanes, 4 columns a lane (8 in the int4
 * AVX-512 chunks of 128 columns, see dot128), and centred
 * there (c = 2^(bits-1) times the lane's sum of xq is subtracted, or the codes are centred in
 * registers), so each lane holds an exact integer of at most 2^20; lanes are converted to
 * float32 and scaled by xs (and, per group, s). Asymmetric groups add (c - z) * sum_b xs*sum(xq)
 * per group. The result equals the float64 sum of the same integers and scales to float32's
 * rounding of the sums.
 *
 * Two instruction sets, chosen at run time: AVX-512 VNNI (+BW, VL) when the CPU has it,
 * otherwise AVX2. On either, one row of x (a decode step) takes four outputs a pass, the x
 * side of each chunk loaded once for four weight rows (quad_vnni128, quad_avx2_64,
 * quad_avx2_8; measured on a 2-core AMD EPYC with AVX2 only, int4 g128 TinyLlama layers
 * streamed from DRAM, 2 threads: 1.2-1.6x the one-row 32-column loop; int8 1.1-1.4x). Compiled with gemv_weight_only.c (slimline/quantize/kernels_gemv.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define QBLOCK 32  /* columns sharing one activation scale */
#define A8_MAX_ROWS 4
#ifndef A8_PREFETCH
#define A8_PREFETCH 4096
#endif
#define A8_PARALLEL_MIN_WORK (1 << 18)

enum { A8_SCALE_F32 = 0, A8_SCALE_F16 = 1, A8_SCALE_BF16 = 2 };

static float a8_scale_at(const void *scales, int kind, int64_t i) {
    if (kind == A8_SCALE_F16) return _cvtsh_ss(((const uint16_t *)scales)[i]);
    if (kind == A8_SCALE_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)scales)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)scales)[i];
}

/* x prepared for one layer call: per row m, xq in the kernel's column order, and per 4-byte
 * lane of that order the scale of its block and the centring term c * sum(xq of the lane). */
struct prepared {
    int8_t *xq;        /* (M, K), permuted within each chunk of `width` columns (int4) */
    float *lane_scale; /* (M, K / 4) */
    int32_t *lane_corr;/* (M, K / 4) */
    float *group_corr; /* (M, G): sum over the group's blocks of xs * sum(xq) */
};

/* One block of 32 values rounded: q = round_half_even(x * (127 / max|x|)), its scale
 * max|x| / 127 and the sum of q. Returns 1 when the block holds NaN or inf, else 0. */
__attribute__((target("avx2,fma"))) static int round_block(const float *x, int8_t *q,
                                                            float *scale, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(__builtin_inff());
    __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        const __m256 a = _mm256_andnot_ps(sign, v[j]);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ)); /* inf or NaN */
        amax = _mm256_max_ps(amax, a);
    }
    if (_mm256_movemask_ps(bad)) return 1;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float top = _mm_cvtss_f32(m4);
    *scale = top / 127.0f;
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m256i n[4];
    for (int j = 0; j < 4; j++) n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)); /* ties to even */
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    *sum = _mm_cvtsi128_si32(t);
    /* int32 -> int8 in order: packs interleave 128-bit halves, the permute undoes it */
    const __m256i w16a = _mm256_packs_epi32(n[0], n[1]), w16b = _mm256_packs_epi32(n[2], n[3]);
    const __m256i w8 = _mm256_packs_epi16(w16a, w16b);
    _mm256_storeu_si256((__m256i *)q,
                        _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return 0;
}

/* Rounds x (M, K) to int8 blocks and lays it out; corr: the centring constant c (0: none).
 * Returns 0, -1 when out of memory, 1 when x holds NaN or inf (which rounding would hide). */
static int prepare_x(const float *x, int64_t M, int64_t K, int64_t group, int bits,
                     int64_t width, int32_t corr, struct prepared *P) {
    const int64_t B = K / QBLOCK, G = (K + group - 1) / group, half = width / 2;
    int8_t *q = malloc((size_t)K);
    float *xs = malloc((size_t)B * sizeof(float));
    int32_t *qsum = malloc((size_t)B * sizeof(int32_t));
    int status = (q && xs && qsum) ? 0 : -1;
    for (int64_t m = 0; m < M && status == 0; m++) {
        for (int64_t b = 0; b < B && status == 0; b++)
            status = round_block(x + m * K + b * QBLOCK, q + b * QBLOCK, xs + b, qsum + b);
        if (status) break;
        int8_t *qm = P->xq + m * K;
        float *lane_scale = P->lane_scale + m * (K / 4);
        int32_t *lane_corr = P->lane_corr + m * (K / 4);
        if (bits == 8) {
            memcpy(qm, q, (size_t)K);
        } else { /* each chunk: its even columns (low nibbles), then its odd ones */
            for (int64_t c0 = 0; c0 < K; c0 += width)
                for (int64_t i = 0; i < half; i++) {
                    qm[c0 + i] = q[c0 + 2 * i];
                    qm[c0 + half + i] = q[c0 + 2 * i + 1];
                }
        }
        /* each lane's block: that of its first column (all 4 share it), walked chunk by
         * chunk (no division by the run-time width: this runs once per layer call) */
        for (int64_t c0 = 0; c0 < K; c0 += width)
            for (int64_t i = 0; i < width; i += 4) {
                const int64_t at = c0 + i;
                const int64_t column = bits == 8 ? at
                                                 : c0 + (i < half ? 2 * i : 2 * (i - half) + 1);
                lane_scale[at / 4] = xs[column / QBLOCK];
                lane_corr[at / 4] = corr * (qm[at] + qm[at + 1] + qm[at + 2] + qm[at + 3]);
            }
        for (int64_t g = 0; g < G; g++) {
            const int64_t b1 = ((g + 1) * group < K ? (g + 1) * group : K) / QBLOCK;
            float sum = 0.0f;
            for (int64_t b = g * group / QBLOCK; b < b1; b++) sum += xs[b] * (float)qsum[b];
            P->group_corr[m * G + g] = sum;
        }
    }
    free(q);
    free(xs);
    free(qsum);
    return status;
}

struct a8_layer {
    const uint8_t *qweight;
    const void *scales;
    const uint8_t *zeros;
    int64_t N, K, group;
    int bits, scale_kind;
    int64_t width; /* columns per chunk of the kernel's x layout: 32, 64 or 128 */
};

/* What the kernels share once a row of outputs is summed: the scale, and the zero-point term. */
static inline void add_group(const struct a8_layer *L, const struct prepared *P, int64_t rows,
                             int64_t n, int64_t g, float *scale, float *rest) {
    const int64_t G = (L->K + L->group - 1) / L->group;
    *scale = a8_scale_at(L->scales, L->scale_kind, n * G + g);
    if (!L->zeros) return;
    const float shift = (float)((1 << (L->bits - 1)) - (int)L->zeros[n * G + g]);
    for (int64_t m = 0; m < rows; m++) rest[m] += *scale * shift * P->group_corr[m * G + g];
}

#define A8_INLINE static inline __attribute__((always_inline))
/* Software prefetch distance of the weight stream, in bytes: measured on a 2-core Xeon (AMX)
 * streaming 48 int4 layers of 2048x5632 from DRAM, 1 thread: none 1536 us a layer, 256 B 1371,
 * 1024 B 1260, 4096 B 1234 (2 threads: 812, 770, 695, 665). */
/* A second prefetch, into L2 only and further ahead, keeps more of the stream in flight: on a
 * 2-core AMD EPYC (Zen 4, AVX-512 VNNI), the 7 layers of a TinyLlama block x 22 streamed from
 * DRAM (medians of interleaved runs), int8 one-row kernel 23.7 -> 27.1 GB/s at 2 threads,
 * 17.9 -> 19.2 at 1 (8192 B; 16384 B the same at 2 threads, no better at 1). */
#ifndef A8_PREFETCH_L2
#define A8_PREFETCH_L2 8192
#endif
/* Calls FN with the row count and the code width as constants (one copy of FN each). */
#define A8_CASE(FN, R)                                          \
    case R:                                                     \
        if (L->bits == 4) FN(L, P, R, 4, n, out);               \
        else FN(L, P, R, 8, n, out);                            \
        break;
#define A8_DISPATCH(FN) \
    switch (rows) { A8_CASE(FN, 1) A8_CASE(FN, 2) A8_CASE(FN, 3) A8_CASE(FN, 4) default: break; }

/* ---- AVX-512 VNNI: vpdpbusd, u8 (codes) x s8 (xq) -> int32, 4 products a lane ---- */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))

VNNI A8_INLINE __m512i codes64(const uint8_t *p, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)p);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p); /* 64 columns */
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw),
                                            _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
}

VNNI A8_INLINE __m256i codes32(const uint8_t *p, int bits) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)p);
    const __m128i raw = _mm_loadu_si128((const __m128i *)p); /* 32 columns */
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw),
                                                 _mm_srli_epi16(raw, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* int4, 128 columns from one 64-byte load: low nibbles (even columns) and high nibbles (odd
 * columns) are two vectors of codes, with no shuffle: fewer instructions per byte read, so
 * more of the weight stream is in flight (the x side is laid out for chunks of 128). */
VNNI A8_INLINE void nibbles128(const uint8_t *p, __m512i *lo, __m512i *hi) {
    const __m512i raw = _mm512_loadu_si512((const void *)p), mask = _mm512_set1_epi8(0x0F);
    *lo = _mm512_and_si512(raw, mask);
    *hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
}

/* One row of x against a 128-column chunk's codes (lo, hi): x0/x1 its int8 codes laid out for
 * them, c the centring terms of both halves' lanes added, s the lanes' block scales. Lane j of
 * the low half holds columns 8j, 8j+2, 8j+4, 8j+6 of the chunk and lane j of the high half
 * 8j+1 .. 8j+7: one block of 32, one scale. So both products go into one int32 lane (8
 * products, exact), which is centred, converted and scaled once: two dot-product instructions
 * and one conversion and multiply-add a chunk instead of two each (measured 1.09-1.19x a layer
 * on the 2-core Xeon, 2048x256 to 2048x32000, 1 and 2 threads). */
VNNI A8_INLINE void dot128(__m512i lo, __m512i hi, __m512i x0, __m512i x1, __m512i c,
                           __m512 s, __m512 *acc) {
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0), hi, x1);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, c)), s, *acc);
}

/* One output for ROWS rows of x, chunks of 64 columns. ROWS and BITS are constants in each
 * copy (see row_vnni64), so the row loops unroll and the accumulators stay in registers; two
 * accumulators a row alternate between chunks to hide the multiply-add's latency. */
VNNI A8_INLINE void rows_vnni64(const struct a8_layer *L, const struct prepared *P,
                                const int64_t ROWS, const int BITS, int64_t n, float *out) {
    const int64_t K = L->K, G = (K + L->group - 1) / L->group, group = L->group, quarter = K / 4;
    const uint8_t *row = L->qweight + n * K * BITS / 8;
    const int8_t *xq = P->xq;
    const int32_t *corr = P->lane_corr;
    const float *lscale = P->lane_scale;
    __m512 total[A8_MAX_ROWS];
    float rest[A8_MAX_ROWS];
    for (int64_t m = 0; m < ROWS; m++) { total[m] = _mm512_setzero_ps(); rest[m] = 0.0f; }
    for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        __m512 even[A8_MAX_ROWS], odd[A8_MAX_ROWS];
        for (int64_t m = 0; m < ROWS; m++) even[m] = odd[m] = _mm512_setzero_ps();
#define CHUNK64(K_, ACC)                                                                    \
    do {                                                                                    \
        _mm_prefetch((const char *)(row + (K_) * BITS / 8 + A8_PREFETCH), _MM_HINT_T0);     \
        _mm_prefetch((const char *)(row + (K_) * BITS / 8 + A8_PREFETCH_L2), _MM_HINT_T1);  \
        const __m512i w = codes64(row + (K_) * BITS / 8, BITS);                             \
        for (int64_t m = 0; m < ROWS; m++) {                                                \
            const int64_t lane = m * quarter + (K_) / 4;                                    \
            __m512i d = _mm512_dpbusd_epi32(                                                \
                _mm512_setzero_si512(), w, _mm512_loadu_si512((const void *)(xq + m * K + (K_)))); \
            d = _mm512_sub_epi32(d, _mm512_loadu_si512((const void *)(corr + lane)));       \
            ACC[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(lscale + lane), \
                                     ACC[m]);                                               \
        }                                                                                   \
    } while (0)
/* int4: 128 columns from one 64-byte load (nibbles128). */
#define CHUNK128(K_)                                                                        \
    do {                                                                                    \
        const uint8_t *p = row + (K_) / 2;                                                  \
        _mm_prefetch((const char *)(p + A8_PREFETCH), _MM_HINT_T0);                         \
        __m512i lo, hi;                                                                     \
        nibbles128(p, &lo, &hi);                                                            \
        for (int64_t m = 0; m < ROWS; m++) {                                                \
            const int64_t lane = m * quarter + (K_) / 4;                                    \
            const int8_t *xm = xq + m * K + (K_);                                           \
            dot128(lo, hi, _mm512_loadu_si512((const void *)xm),                            \
                   _mm512_loadu_si512((const void *)(xm + 64)),                             \
                   _mm512_add_epi32(_mm512_loadu_si512((const void *)(corr + lane)),        \
                                    _mm512_loadu_si512((const void *)(corr + lane + 16))),  \
                   _mm512_loadu_ps(lscale + lane), &even[m]);                               \
        }                                                                                   \
    } while (0)
        int64_t k = k0;
        if (BITS == 4 && L->width == 128) {
            for (; k < k1; k += 128) CHUNK128(k);
        } else {
            for (; k + 128 <= k1; k += 128) {
                CHUNK64(k, even);
                CHUNK64(k + 64, odd);
            }
            if (k < k1) CHUNK64(k, even);
        }
#undef CHUNK64
#undef CHUNK128
        float scale;
        add_group(L, P, ROWS, n, g, &scale, rest);
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t m = 0; m < ROWS; m++)
            total[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), s, total[m]);
    }
    for (int64_t m = 0; m < ROWS; m++) out[m * L->N] = _mm512_reduce_add_ps(total[m]) + rest[m];
}

VNNI static void row_vnni64(const struct a8_layer *L, const struct prepared *P, int64_t rows,
                            int64_t n, float *out) {
    A8_DISPATCH(rows_vnni64)
}

/* Four outputs n..n+3 for one row of x (a decode step), int4 codes in chunks of 128 columns:
 * the x side of a chunk (its 128 codes, centring terms and lane scales) is loaded once for
 * the four weight rows instead of once a row, so a chunk costs a weight load and the integer
 * and float work, which keeps more of the weight stream in flight (measured on the 2-core
 * Xeon: 1.2-1.5x the one-row loop on 2048x256 to 2048x32000 layers, 1 and 2 threads). Each
 * row prefetches its own position in the next pass's rows (4 rows on): 2048 columns keep the
 * one-row loop's 4096 bytes ahead, 5632 ran ~10% faster than with them; and into L2 only, the
 * rows two passes on (Zen 4 EPYC, a TinyLlama block's int4 g128 layers x 22 from DRAM, medians:
 * 15.5 -> 18.9 GB/s at 2 threads, 9.0 -> 14.1 at 1; 4 passes on the same, 16 no better at 1
 * thread). Each output's products,
 * sums and their order are rows_vnni64's for ROWS = 1 (the results are the same bits). */
#define A8_QUAD 4
VNNI static void quad_vnni128(const struct a8_layer *L, const struct prepared *P, int64_t n,
                              float *out) {
    const int64_t K = L->K, G = (K + L->group - 1) / L->group, group = L->group;
    const int64_t stride = K / 2; /* bytes a weight row */
    const uint8_t *rows = L->qweight + n * stride;
    __m512 total[A8_QUAD];
    float rest[A8_QUAD];
    for (int r = 0; r < A8_QUAD; r++) { total[r] = _mm512_setzero_ps(); rest[r] = 0.0f; }
    for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        __m512 acc[A8_QUAD]; /* rows_vnni64's even; its odd stays 0 in chunks of 128 */
        for (int r = 0; r < A8_QUAD; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 128) {
            const __m512i x0 = _mm512_loadu_si512((const void *)(P->xq + k));
            const __m512i x1 = _mm512_loadu_si512((const void *)(P->xq + k + 64));
            const __m512i c = _mm512_add_epi32(
                _mm512_loadu_si512((const void *)(P->lane_corr + k / 4)),
                _mm512_loadu_si512((const void *)(P->lane_corr + k / 4 + 16)));
            const __m512 s0 = _mm512_loadu_ps(P->lane_scale + k / 4);
            for (int r = 0; r < A8_QUAD; r++) {
                const uint8_t *p = rows + r * stride + k / 2;
                _mm_prefetch((const char *)(p + A8_QUAD * stride), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 2 * A8_QUAD * stride), _MM_HINT_T1);
                __m512i lo, hi;
                nibbles128(p, &lo, &hi);
                dot128(lo, hi, x0, x1, c, s0, &acc[r]);
            }
        }
        for (int r = 0; r < A8_QUAD; r++) {
            float scale;
            add_group(L, P, 1, n + r, g, &scale, rest + r);
            total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(scale), total[r]);
        }
    }
    for (int r = 0; r < A8_QUAD; r++) out[r] = _mm512_reduce_add_ps(total[r]) + rest[r];
}

/* 32 columns of centred products, one int32 lane per 4 columns: vpdpbusd on 256 bits. */
VNNI A8_INLINE __m256i dot32_vnni(const uint8_t *p, int bits, const int8_t *xq) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes32(p, bits),
                               _mm256_loadu_si256((const __m256i *)xq));
}

/* ---- AVX2: vpmaddubsw + vpmaddwd, 2 products a 16-bit lane, then 4 a 32-bit lane ---- */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* Sum of products of 32 centred int8 codes (or uncentred int4 codes) with 32 xq, per lane. */
AVX2 A8_INLINE __m256i dot32_avx2(const uint8_t *p, int bits, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    __m256i pairs;
    if (bits == 8) { /* u - 128 as int8; |w| unsigned times x with w's sign: no saturation */
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p),
                                           _mm256_set1_epi8((char)0x80));
        pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    } else {
        const __m128i raw = _mm_loadu_si128((const __m128i *)p);
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw),
                                                     _mm_srli_epi16(raw, 4), 1);
        pairs = _mm256_maddubs_epi16(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), x);
    }
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* Both kernels' horizontal sum (AVX2 code inlines into the AVX-512 one too). */
AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 columns at K_ for every row, into the accumulators ACC (one a row). */
#define CHUNK32(DOT, K_, ACC)                                                               \
    do {                                                                                    \
        for (int64_t m = 0; m < ROWS; m++) {                                                \
            const int64_t lane = m * quarter + (K_) / 4;                                    \
            __m256i d = DOT(row + (K_) * BITS / 8, BITS, xq + m * K + (K_));                \
            d = _mm256_sub_epi32(d, _mm256_loadu_si256((const __m256i *)(corr + lane)));    \
            ACC[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(lscale + lane), \
                                     ACC[m]);                                               \
        }                                                                                   \
    } while (0)

/* One output for ROWS rows of x in chunks of 32 columns; DOT gives a chunk's int32 lanes.
 * As rows_vnni64: ROWS and BITS constant in each copy, two accumulators a row. */
#define ROW32(NAME, TARGET, DOT, HSUM)                                                         \
    TARGET A8_INLINE void NAME##_rows(const struct a8_layer *L, const struct prepared *P,     \
                                      const int64_t ROWS, const int BITS, int64_t n,          \
                                      float *out) {                                           \
        const int64_t K = L->K, G = (K + L->group - 1) / L->group, group = L->group;           \
        const int64_t quarter = K / 4;                                                         \
        const uint8_t *row = L->qweight + n * K * BITS / 8;                                    \
        const int8_t *xq = P->xq;                                                              \
        const int32_t *corr = P->lane_corr;                                                    \
        const float *lscale = P->lane_scale;                                                   \
        __m256 total[A8_MAX_ROWS];                                                             \
        float rest[A8_MAX_ROWS];                                                               \
        for (int64_t m = 0; m < ROWS; m++) { total[m] = _mm256_setzero_ps(); rest[m] = 0.0f; } \
        for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {                                 \
            const int64_t k1 = k0 + group < K ? k0 + group : K;                                \
            __m256 even[A8_MAX_ROWS], odd[A8_MAX_ROWS];                                        \
            for (int64_t m = 0; m < ROWS; m++) even[m] = odd[m] = _mm256_setzero_ps();         \
            int64_t k = k0;                                                                    \
            for (; k + 64 <= k1; k += 64) {                                                    \
                CHUNK32(DOT, k, even);                                                         \
                CHUNK32(DOT, k + 32, odd);                                                     \
            }                                                                                  \
            if (k < k1) CHUNK32(DOT, k, even);                                                 \
            float scale;                                                                       \
            add_group(L, P, ROWS, n, g, &scale, rest);                                         \
            const __m256 s = _mm256_set1_ps(scale);                                            \
            for (int64_t m = 0; m < ROWS; m++)                                                 \
                total[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), s, total[m]);       \
        }                                                                                      \
        for (int64_t m = 0; m < ROWS; m++) out[m * L->N] = HSUM(total[m]) + rest[m];          \
    }                                                                                          \
    TARGET static void NAME(const struct a8_layer *L, const struct prepared *P, int64_t rows,  \
                            int64_t n, float *out) {                                           \
        A8_DISPATCH(NAME##_rows)                                                               \
    }

ROW32(row_avx2, AVX2, dot32_avx2, hsum8)
ROW32(row_vnni32, VNNI, dot32_vnni, hsum8)

/* int4 on AVX2, 64 columns from one 32-byte load: the low nibbles (even columns) and the high
 * nibbles (odd columns) are two vectors of codes, and x is laid out for chunks of 64 (its even
 * columns, then its odd ones), as nibbles128 does with 128 on AVX-512. Lane j of the low half
 * holds columns 8j, 8j+2, 8j+4, 8j+6 and lane j of the high half 8j+1 .. 8j+7, one block of
 * 32: the two vpmaddubsw results are added in 16 bits (each at most 2 * 15 * 127, so the sum
 * fits) and widened once, so a lane holds 8 exact products and is centred, converted and
 * scaled once. Per 32 bytes of codes: one load, shift and two masks, two vpmaddubsw, one add,
 * one vpmaddwd, and the centring, conversion and multiply-add (the 32-column loop took two of
 * each of the last four plus a load, a shift and an insert per 16 bytes). */
AVX2 A8_INLINE __m256 dot64_avx2(const uint8_t *p, __m256i x0, __m256i x1, __m256i c,
                                 __m256 s, __m256 acc) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p), mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(raw, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0),
                                           _mm256_maddubs_epi16(hi, x1));
    const __m256i d = _mm256_sub_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), c);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);
}

/* The x side of the 64-column chunk at k of row m: its two halves of codes, the centring
 * terms of both halves' lanes added, and the lanes' block scales. */
#define X64_AVX2(M_, K_)                                                                    \
    const int8_t *xm = P->xq + (M_) * K + (K_);                                             \
    const int64_t lane = (M_) * (K / 4) + (K_) / 4;                                         \
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)xm);                             \
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xm + 32));                      \
    const __m256i c = _mm256_add_epi32(                                                     \
        _mm256_loadu_si256((const __m256i *)(P->lane_corr + lane)),                         \
        _mm256_loadu_si256((const __m256i *)(P->lane_corr + lane + 8)));                    \
    const __m256 s0 = _mm256_loadu_ps(P->lane_scale + lane)

/* Groups of 32 (llama.cpp Q4_0's grid): a 64-column chunk spans groups g and g + 1, lanes 0-3
 * the first and 4-7 the second, so each lane's block scale is multiplied by its group's scale
 * before the multiply-add and the sums need no step per group. Adds both groups' zero-point
 * terms to rest (ROWS rows). */
AVX2 A8_INLINE __m256 pair_scales(const struct a8_layer *L, const struct prepared *P,
                                  int64_t rows, int64_t n, int64_t g, float *rest) {
    float first, second;
    add_group(L, P, rows, n, g, &first, rest);
    add_group(L, P, rows, n, g + 1, &second, rest);
    return _mm256_setr_m128(_mm_set1_ps(first), _mm_set1_ps(second));
}

/* One int4 output for ROWS rows of x in chunks of 64 columns (width 64: groups hold whole
 * chunks, or PAIR: groups of 32, two a chunk). One accumulator a row (four rows' chains in
 * the four-output loop already hide the multiply-add's latency, and a second set spilled
 * there); quad_avx2_64 sums in this order. */
AVX2 A8_INLINE void rows_avx2_64(const struct a8_layer *L, const struct prepared *P,
                                 const int64_t ROWS, const int PAIR, int64_t n, float *out) {
    const int64_t K = L->K, group = PAIR ? 64 : L->group, G = (K + group - 1) / group;
    const uint8_t *row = L->qweight + n * (K / 2);
    __m256 total[A8_MAX_ROWS];
    float rest[A8_MAX_ROWS];
    for (int64_t m = 0; m < ROWS; m++) { total[m] = _mm256_setzero_ps(); rest[m] = 0.0f; }
    for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        __m256 acc[A8_MAX_ROWS];
        for (int64_t m = 0; m < ROWS; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            _mm_prefetch((const char *)(row + k / 2 + A8_PREFETCH), _MM_HINT_T0);
            const __m256 gs = PAIR ? pair_scales(L, P, ROWS, n, k / 32, rest)
                                   : _mm256_set1_ps(1.0f);
            for (int64_t m = 0; m < ROWS; m++) {
                X64_AVX2(m, k);
                acc[m] = dot64_avx2(row + k / 2, x0, x1, c, PAIR ? _mm256_mul_ps(s0, gs) : s0,
                                    acc[m]);
            }
        }
        if (PAIR) {
            for (int64_t m = 0; m < ROWS; m++) total[m] = _mm256_add_ps(total[m], acc[m]);
            continue;
        }
        float scale;
        add_group(L, P, ROWS, n, g, &scale, rest);
        const __m256 s = _mm256_set1_ps(scale);
        for (int64_t m = 0; m < ROWS; m++) total[m] = _mm256_fmadd_ps(acc[m], s, total[m]);
    }
    for (int64_t m = 0; m < ROWS; m++) out[m * L->N] = hsum8(total[m]) + rest[m];
}

#define A8_CASE64(R)                                                  \
    case R:                                                           \
        if (L->group == 32) rows_avx2_64(L, P, R, 1, n, out);         \
        else rows_avx2_64(L, P, R, 0, n, out);                        \
        break;
AVX2 static void row_avx2_64(const struct a8_layer *L, const struct prepared *P, int64_t rows,
                             int64_t n, float *out) {
    switch (rows) { A8_CASE64(1) A8_CASE64(2) A8_CASE64(3) A8_CASE64(4) default: break; }
}
#undef A8_CASE64

/* Four int4 outputs n..n+3 for one row of x (a decode step), as quad_vnni128 on AVX-512: the
 * x side of a chunk is loaded once for the four weight rows, each row prefetches its place in
 * the next pass's rows, and each output's products, sums and their order are rows_avx2_64's
 * for one row (the same bits). */
AVX2 A8_INLINE void quad_avx2_64_body(const struct a8_layer *L, const struct prepared *P,
                                      const int PAIR, int64_t n, float *out) {
    const int64_t K = L->K, group = PAIR ? 64 : L->group, G = (K + group - 1) / group;
    const int64_t stride = K / 2; /* bytes a weight row */
    const uint8_t *rows = L->qweight + n * stride;
    __m256 total[A8_QUAD];
    float rest[A8_QUAD];
    for (int r = 0; r < A8_QUAD; r++) { total[r] = _mm256_setzero_ps(); rest[r] = 0.0f; }
    for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        __m256 acc[A8_QUAD];
        for (int r = 0; r < A8_QUAD; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            X64_AVX2(0, k);
            for (int r = 0; r < A8_QUAD; r++) {
                const uint8_t *p = rows + r * stride + k / 2;
                _mm_prefetch((const char *)(p + A8_QUAD * stride), _MM_HINT_T0);
                const __m256 s = PAIR ? _mm256_mul_ps(s0, pair_scales(L, P, 1, n + r, k / 32,
                                                                      rest + r))
                                      : s0;
                acc[r] = dot64_avx2(p, x0, x1, c, s, acc[r]);
            }
        }
        for (int r = 0; r < A8_QUAD; r++) {
            if (PAIR) {
                total[r] = _mm256_add_ps(total[r], acc[r]);
                continue;
            }
            float scale;
            add_group(L, P, 1, n + r, g, &scale, rest + r);
            total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(scale), total[r]);
        }
    }
    for (int r = 0; r < A8_QUAD; r++) out[r] = hsum8(total[r]) + rest[r];
}

AVX2 static void quad_avx2_64(const struct a8_layer *L, const struct prepared *P, int64_t n,
                              float *out) {
    if (L->group == 32) quad_avx2_64_body(L, P, 1, n, out);
    else quad_avx2_64_body(L, P, 0, n, out);
}
#undef X64_AVX2

/* Four int8 outputs n..n+3 for one row of x on AVX2, in chunks of 32 columns: the x side of a
 * chunk (its codes and lane scales) is loaded once for the four weight rows, as quad_avx2_64
 * does for int4. The codes are centred in registers (dot32_avx2's sign trick), so there is no
 * centring term; each output's sums and their order are row_avx2's for one row. */
AVX2 static void quad_avx2_8(const struct a8_layer *L, const struct prepared *P, int64_t n,
                             float *out) {
    const int64_t K = L->K, G = (K + L->group - 1) / L->group, group = L->group;
    const uint8_t *rows = L->qweight + n * K;
    __m256 total[A8_QUAD];
    float rest[A8_QUAD];
    for (int r = 0; r < A8_QUAD; r++) { total[r] = _mm256_setzero_ps(); rest[r] = 0.0f; }
    for (int64_t g = 0, k0 = 0; g < G; g++, k0 += group) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        __m256 even[A8_QUAD], odd[A8_QUAD];
        for (int r = 0; r < A8_QUAD; r++) even[r] = odd[r] = _mm256_setzero_ps();
#define QUAD32_AVX2(K_, ACC)                                                                \
    do {                                                                                    \
        const __m256 s0 = _mm256_loadu_ps(P->lane_scale + (K_) / 4);                        \
        for (int r = 0; r < A8_QUAD; r++) {                                                 \
            const uint8_t *p = rows + r * K + (K_);                                         \
            _mm_prefetch((const char *)(p + A8_QUAD * K), _MM_HINT_T0);                     \
            ACC[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_avx2(p, 8, P->xq + (K_))), s0, \
                                     ACC[r]);                                               \
        }                                                                                   \
    } while (0)
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) {
            QUAD32_AVX2(k, even);
            QUAD32_AVX2(k + 32, odd);
        }
        if (k < k1) QUAD32_AVX2(k, even);
#undef QUAD32_AVX2
        for (int r = 0; r < A8_QUAD; r++) {
            float scale;
            add_group(L, P, 1, n + r, g, &scale, rest + r);
            total[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), _mm256_set1_ps(scale),
                                       total[r]);
        }
    }
    for (int r = 0; r < A8_QUAD; r++) out[r] = hsum8(total[r]) + rest[r];
}

/* Which kernel this CPU runs: 2 = AVX-512 VNNI, 1 = AVX2, 0 = none. */
int slimline_gemv_a8_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

/* out (M, N) = (x rounded to int8 blocks) (M, K) @ dequant(W)^T, for bits 4 or 8, K a
 * multiple of 32, group a multiple of 32 or >= K. isa: 0 for the best this CPU has, or 1
 * (AVX2) / 2 (AVX-512 VNNI) to ask for one (tests run both on one machine). Returns 0; 1 when
 * x holds NaN or inf (nothing written: the caller takes the float32 kernel, which carries
 * them); -1 for arguments it does not handle (the caller checks them first), an instruction
 * set the CPU lacks, or a failed allocation. */
int slimline_gemv_a8(const float *x, int64_t M, int64_t K, const uint8_t *qweight, int64_t N,
                     int bits, int64_t group, const void *scales, int scale_kind,
                     const uint8_t *zeros, float *out, int isa) {
    const int best = slimline_gemv_a8_isa();
    if (isa == 0) isa = best;
    if ((bits != 4 && bits != 8) || M < 1 || N < 1 || K < QBLOCK || K % QBLOCK || isa < 1
        || isa > best)
        return -1;
    if (group > K) group = K;
    if (group < QBLOCK || group % QBLOCK) return -1;
    const int64_t G = (K + group - 1) / group;
    /* Chunks of 128 (int4, AVX-512) or 64 columns (one zmm of codes; AVX2: one ymm of int4
     * codes) where groups and rows hold whole chunks (AVX2 int4: or groups of 32, two a
     * chunk); else 32. */
    const int64_t width = isa == 2 && bits == 4 && group % 128 == 0 && K % 128 == 0 ? 128
                          : isa == 1 && bits == 4 && (group % 64 == 0 || group == 32)
                                  && K % 64 == 0                                      ? 64
                          : isa == 2 && group % 64 == 0 && K % 64 == 0                ? 64
                                                                                      : 32;
    /* Centring per lane: the codes' offset c, except where AVX2 centres int8 in registers. */
    const int32_t corr = (isa == 1 && bits == 8) ? 0 : (1 << (bits - 1));
    struct prepared P;
    P.xq = malloc((size_t)(M * K));
    P.lane_scale = malloc((size_t)(M * K / 4) * sizeof(float));
    P.lane_corr = malloc((size_t)(M * K / 4) * sizeof(int32_t));
    P.group_corr = malloc((size_t)(M * G) * sizeof(float));
    int status = 0;
    if (!P.xq || !P.lane_scale || !P.lane_corr || !P.group_corr) {
        status = -1;
        goto done;
    }
    status = prepare_x(x, M, K, group, bits, width, corr, &P);
    if (status != 0) goto done;
    const struct a8_layer L = {qweight, scales, zeros, N, K, group, bits, scale_kind, width};
    for (int64_t m0 = 0; m0 < M; m0 += A8_MAX_ROWS) {
        const int64_t rows = M - m0 < A8_MAX_ROWS ? M - m0 : A8_MAX_ROWS;
        struct prepared Pm = {P.xq + m0 * K, P.lane_scale + m0 * (K / 4),
                              P.lane_corr + m0 * (K / 4), P.group_corr + m0 * G};
        const int64_t block = 16; /* outputs per task (a multiple of A8_QUAD) */
        /* one row of x: four outputs a pass where a kernel has it */
        const int quad = rows == 1 && (bits == 4 ? width == 128 || (isa == 1 && width == 64)
                                                 : isa == 1);
#pragma omp parallel for schedule(static) if (N * K * rows >= A8_PARALLEL_MIN_WORK)
        for (int64_t n0 = 0; n0 < N; n0 += block) {
            const int64_t n1 = n0 + block < N ? n0 + block : N;
            int64_t n = n0;
            if (quad) /* one row of x: four outputs a pass, the rest one by one */
                for (; n + A8_QUAD <= n1; n += A8_QUAD) {
                    if (isa == 1 && bits == 8) quad_avx2_8(&L, &Pm, n, out + m0 * N + n);
                    else if (isa == 1) quad_avx2_64(&L, &Pm, n, out + m0 * N + n);
                    else quad_vnni128(&L, &Pm, n, out + m0 * N + n);
                }
            for (; n < n1; n++) {
                float *o = out + m0 * N + n;
                if (isa == 1 && width == 64) row_avx2_64(&L, &Pm, rows, n, o);
                else if (isa == 1) row_avx2(&L, &Pm, rows, n, o);
                else if (width >= 64) row_vnni64(&L, &Pm, rows, n, o);
                else row_vnni32(&L, &Pm, rows, n, o);
            }
        }
    }
done:
    free(P.xq);
    free(P.lane_scale);
    free(P.lane_corr);
    free(P.group_corr);
    return status;
}
