/* Weight-only int4/int8 matrix-vector products for slimline's QuantLinear, in float32.
 *
 * y[m, n] = sum_g s[n, g] * sum_{k in g} (u[n, k] - z[n, g]) * x[m, k]
 *
 * u: the stored codes of slimline's packing (a dense little-endian bit stream, row-major
 * (N, K): int4 is two codes a byte, low nibble first; int8 one a byte), s: (N, G) scales in
 * float32, float16 or bfloat16, z: (N, G) uint8 zero points, or NULL for the symmetric grid
 * (z = 2^(bits-1)). Groups of `group` columns along K, the last one possibly shorter.
 *
 * Why: at batch 1 a decode step reads every weight once and does two flops with it, so its
 * time is the bytes it reads. Dequantizing to float32 first writes and reads four bytes a
 * weight; this reads half a byte (int4) or one (int8) and widens the codes in registers.
 * Codes are centred in integers (u - c, c = 2^(bits-1)) before conversion, so a symmetric
 * layer sums exactly the products the dequantized reference sums (no large offset to cancel);
 * an asymmetric one adds (c - z) * sum_{k in g} x[m, k] per group.
 *
 * Compiled at first use with -O3 -mavx2 -mfma -mf16c -fopenmp (slimline/quantize/
 * kernels_gemv.py); OpenMP resolves to the libgomp torch already loaded, so its threads
 * are torch's (torch.set_num_threads). A build without AVX2 keeps only the scalar loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };
#define MAX_ROWS 4 /* rows of x sharing one decode of the weights (16 ymm registers) */
#define PARALLEL_MIN_WORK (1 << 18) /* weights x rows; about 30 us on one Zen 3 core */

/* A packed layer: codes, their grid and its shape. */
struct layer {
    const uint8_t *qweight; /* (N, K) codes, ceil(N * K * bits / 8) bytes */
    const void *scales;     /* (N, G) */
    const uint8_t *zeros;   /* (N, G), or NULL: symmetric, z = 2^(bits-1) */
    int64_t N, K, group;
    int bits, scale_kind;
    int64_t G; /* groups a row: ceil(K / group) */
};

static float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        exp = 113u;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float scale_at(const void *scales, int kind, int64_t i) {
    if (kind == SCALE_F16) return half_to_float(((const uint16_t *)scales)[i]);
    if (kind == SCALE_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)scales)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)scales)[i];
}

static inline float group_scale(const struct layer *L, int64_t n, int64_t g) {
    return scale_at(L->scales, L->scale_kind, n * L->G + g);
}

/* c - z: what turns the centred codes u - c into u - z (0 when symmetric). */
static inline float zero_shift(const struct layer *L, int64_t n, int64_t g) {
    if (!L->zeros) return 0.0f;
    return (float)((1 << (L->bits - 1)) - (int)L->zeros[n * L->G + g]);
}

/* The centred code u - c of column k of a row starting at byte `row`. */
static int code_at(const uint8_t *row, int bits, int64_t k) {
    if (bits == 8) return (int)row[k] - 128;
    int byte = row[k >> 1];
    return ((k & 1) ? (byte >> 4) : (byte & 0x0F)) - 8;
}

/* sum_{k in [k0, k1)} (u - c) * x[m, k] for the rows of x, scalar. */
static void group_dots_scalar(const uint8_t *row, int bits, const float *x, int64_t K,
                              int64_t rows, int64_t k0, int64_t k1, float *dots) {
    for (int64_t k = k0; k < k1; k++) {
        float w = (float)code_at(row, bits, k);
        for (int64_t m = 0; m < rows; m++) dots[m] += w * x[m * K + k];
    }
}

#ifdef __AVX2__
/* Two ways to widen codes to floats, for two kinds of groups:
 *
 * "lanes" (groups a multiple of a 32-byte block, or one group a row): 32 bytes of codes are
 * eight 32-bit lanes; field j of every lane is shifted to the top bits and masked, which
 * gives (u - c) * 2^(32 - bits) as a signed int32 once the word is XORed with c in every
 * field (u ^ c is u - c in two's complement). Eight (int4) or four (int8) vectors of eight
 * codes for one load, with shifts and masks only: no shuffles, which bound the other way
 * (Zen 3 runs one a cycle). Vector j, lane l holds column per * l + j of the block, so x is
 * permuted to match once per call (see permute_x); 2^-(32 - bits) goes into the scale.
 *
 * "decode32" (other even groups): 16 or 32 bytes are split into bytes in column order and
 * sign-extended, four shuffles per 32 codes. */
#define BLOCK_BYTES 32

static inline int64_t block_codes(int bits) { return BLOCK_BYTES * 8 / bits; }

static inline __m256 top_field(__m256i v, __m256i mask) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
}

/* The fields of one 32-byte block, (u - c) * 2^(32 - bits), field j in w[j]. */
static inline void decode_lanes(const uint8_t *block, int bits, __m256 *w) {
    __m256i v = _mm256_loadu_si256((const __m256i *)block);
    if (bits == 4) {
        const __m256i top = _mm256_set1_epi32((int)0xF0000000u);
        v = _mm256_xor_si256(v, _mm256_set1_epi32((int)0x88888888u));
        w[0] = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 28));
        w[1] = top_field(_mm256_slli_epi32(v, 24), top);
        w[2] = top_field(_mm256_slli_epi32(v, 20), top);
        w[3] = top_field(_mm256_slli_epi32(v, 16), top);
        w[4] = top_field(_mm256_slli_epi32(v, 12), top);
        w[5] = top_field(_mm256_slli_epi32(v, 8), top);
        w[6] = top_field(_mm256_slli_epi32(v, 4), top);
        w[7] = top_field(v, top);
    } else {
        const __m256i top = _mm256_set1_epi32((int)0xFF000000u);
        v = _mm256_xor_si256(v, _mm256_set1_epi32((int)0x80808080u));
        w[0] = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 24));
        w[1] = top_field(_mm256_slli_epi32(v, 16), top);
        w[2] = top_field(_mm256_slli_epi32(v, 8), top);
        w[3] = top_field(v, top);
    }
}

/* 32 centred codes from column k (even for int4) as four vectors of 8 floats, in order. */
static inline void decode32(const uint8_t *row, int bits, int64_t k, __m256 w[4]) {
    __m128i c0, c1;
    if (bits == 8) {
        const __m128i flip = _mm_set1_epi8((char)0x80); /* u ^ 0x80 is u - 128 as int8 */
        c0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k)), flip);
        c1 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k + 16)), flip);
    } else {
        const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        __m128i b = _mm_loadu_si128((const __m128i *)(row + (k >> 1)));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
        __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
        c0 = _mm_unpacklo_epi8(lo, hi); /* columns k .. k+15, in order */
        c1 = _mm_unpackhi_epi8(lo, hi); /* columns k+16 .. k+31 */
    }
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c0));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c0, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c1));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c1, 8)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The vector loops below sum over the whole blocks (lanes) or 32-code chunks (decode32) of
 * [k, k1) and return where the scalar tail starts. One row of x: four accumulators acc[0..3]
 * (independent chains hide the FMA latency); several: one per row, acc[m]. Each is inlined
 * with `bits` a constant, so the per-field loops unroll into registers. */
#define INLINE static inline __attribute__((always_inline))

INLINE int64_t lanes_one(const uint8_t *row, int bits, const float *xp, int64_t k,
                         int64_t k1, __m256 *acc) {
    const int64_t B = block_codes(bits), per = 32 / bits;
    const uint8_t *p = row + k * bits / 8;
    __m256 w[8];
    for (; k + B <= k1; k += B, p += BLOCK_BYTES) {
        decode_lanes(p, bits, w);
        for (int64_t j = 0; j < per; j++)
            acc[j & 3] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp + k + 8 * j), acc[j & 3]);
    }
    return k;
}

INLINE int64_t lanes_many(const uint8_t *row, int bits, int64_t K, const float *xp,
                          int64_t rows, int64_t k, int64_t k1, __m256 *acc) {
    const int64_t B = block_codes(bits), per = 32 / bits;
    const uint8_t *p = row + k * bits / 8;
    __m256 w[8];
    for (; k + B <= k1; k += B, p += BLOCK_BYTES) {
        decode_lanes(p, bits, w);
        for (int64_t j = 0; j < per; j++)
            for (int64_t m = 0; m < rows; m++)
                acc[m] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp + m * K + k + 8 * j), acc[m]);
    }
    return k;
}

INLINE int64_t chunks_one(const uint8_t *row, int bits, const float *x, int64_t k,
                          int64_t k1, __m256 *acc) {
    __m256 w[4];
    for (; k + 32 <= k1; k += 32) {
        decode32(row, bits, k, w);
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + k + 8 * j), acc[j]);
    }
    return k;
}

INLINE int64_t chunks_many(const uint8_t *row, int bits, int64_t K, const float *x,
                           int64_t rows, int64_t k, int64_t k1, __m256 *acc) {
    __m256 w[4];
    for (; k + 32 <= k1; k += 32) {
        decode32(row, bits, k, w);
        for (int64_t m = 0; m < rows; m++) {
            const float *xm = x + m * K + k;
            __m256 a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xm), acc[m]);
            __m256 b = _mm256_mul_ps(w[1], _mm256_loadu_ps(xm + 8));
            a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), a);
            b = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), b);
            acc[m] = _mm256_add_ps(a, b);
        }
    }
    return k;
}

INLINE int64_t group_vectors_of(const uint8_t *row, int bits, int64_t K, const float *x,
                                const float *xp, int64_t rows, int64_t k, int64_t k1,
                                __m256 *acc) {
    if (xp)
        return rows == 1 ? lanes_one(row, bits, xp, k, k1, acc)
                         : lanes_many(row, bits, K, xp, rows, k, k1, acc);
    return rows == 1 ? chunks_one(row, bits, x, k, k1, acc)
                     : chunks_many(row, bits, K, x, rows, k, k1, acc);
}

/* The vector sums of [k, k1) for `rows` rows of x; xp: x permuted (lanes), or NULL. */
static int64_t group_vectors(const uint8_t *row, const struct layer *L, const float *x,
                             const float *xp, int64_t rows, int64_t k, int64_t k1,
                             __m256 *acc) {
    if (L->bits == 4)
        return group_vectors_of(row, 4, L->K, x, xp, rows, k, k1, acc);
    return group_vectors_of(row, 8, L->K, x, xp, rows, k, k1, acc);
}

/* One output for each of `rows` (<= MAX_ROWS) rows of x: one decode serves every row; group
 * sums are scaled and added in vectors, one horizontal sum per output. */
static void row_dot_vector(const uint8_t *row, const struct layer *L, const float *x,
                           const float *xp, int64_t rows, const float *xsum, int64_t n,
                           float *out) {
    const int64_t K = L->K, G = L->G;
    const float unit = xp ? (L->bits == 4 ? 0x1p-28f : 0x1p-24f) : 1.0f; /* lanes' scaling */
    __m256 total[MAX_ROWS];
    float rest[MAX_ROWS]; /* scalar tails and zero-point terms */
    for (int64_t m = 0; m < rows; m++) { total[m] = _mm256_setzero_ps(); rest[m] = 0.0f; }
    for (int64_t g = 0, k0 = 0; k0 < K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < K ? k0 + L->group : K;
        __m256 acc[MAX_ROWS];
        for (int64_t m = 0; m < MAX_ROWS; m++) acc[m] = _mm256_setzero_ps();
        const int64_t k = group_vectors(row, L, x, xp, rows, k0, k1, acc);
        if (rows == 1)
            acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        const float s = group_scale(L, n, g), shift = zero_shift(L, n, g);
        float tails[MAX_ROWS] = {0};
        group_dots_scalar(row, L->bits, x, K, rows, k, k1, tails);
        const __m256 scaled = _mm256_set1_ps(s * unit);
        for (int64_t m = 0; m < rows; m++) {
            total[m] = _mm256_fmadd_ps(acc[m], scaled, total[m]);
            rest[m] += s * (tails[m] + shift * (xsum ? xsum[m * G + g] : 0.0f));
        }
    }
    for (int64_t m = 0; m < rows; m++) out[m * L->N] = hsum(total[m]) + rest[m];
}

/* x (rows, K) with each whole block's columns reordered as decode_lanes gives its codes:
 * xp[b + 8 j + l] = x[b + per l + j]; the tail past the last whole block is not used. */
static void permute_x(const float *x, int64_t rows, int64_t K, int bits, float *xp) {
    const int64_t B = block_codes(bits), per = 32 / bits;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t b = 0; b + B <= K; b += B)
            for (int64_t j = 0; j < per; j++)
                for (int64_t l = 0; l < 8; l++)
                    xp[m * K + b + 8 * j + l] = x[m * K + b + per * l + j];
}
#endif

#ifndef __AVX2__
/* One output for each of `rows` rows of x, without SIMD. */
static void row_dot_scalar(const uint8_t *row, const struct layer *L, const float *x,
                           int64_t rows, const float *xsum, int64_t n, float *out) {
    const int64_t K = L->K, G = (K + L->group - 1) / L->group;
    float total[MAX_ROWS] = {0};
    for (int64_t g = 0, k0 = 0; k0 < K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < K ? k0 + L->group : K;
        float dots[MAX_ROWS] = {0};
        group_dots_scalar(row, L->bits, x, K, rows, k0, k1, dots);
        const float s = group_scale(L, n, g), shift = zero_shift(L, n, g);
        for (int64_t m = 0; m < rows; m++)
            total[m] += s * (dots[m] + shift * (xsum ? xsum[m * G + g] : 0.0f));
    }
    for (int64_t m = 0; m < rows; m++) out[m * L->N] = total[m];
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
/* AVX-512, chosen at run time (slimline_gemv_isa), for groups of whole 32-column chunks
 * (or one group a row). 16 float lanes halve the instructions per code, and:
 *
 * int4 "pairs", by table lookup: the 16 bytes of 32 columns are widened to one byte a 32-bit
 * lane; vpermps reads the low 4 bits of each lane as an index into a register holding the
 * group's 16 dequantized values (u - z) * s, u = 0 .. 15 (the reference's own products, so
 * each weight is bit-identical to the dequantized one), so lane i becomes column 2i (low
 * nibble) and, after a 4-bit shift, column 2i + 1: a widening, a shift, two lookups and two
 * fused multiply-adds per 32 codes, and nothing per group but one table (no sum to scale).
 * x is permuted to match once per call (permute_pairs: xp[b + i] = x[b + 2i],
 * xp[b + 16 + i] = x[b + 2i + 1]). One row of x (a decode step) with groups of whole
 * 128-column chunks skips the widening: a 64-byte load holds eight codes a lane, and shifts
 * bring each to the bits vpermps reads (int4_octets_512).
 * int8: 16 codes sign-extended (after u ^ 0x80, which is u - 128) and converted, in column
 * order, summed per group and scaled as the AVX2 kernel does; x is read as it is. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 2048 /* bytes ahead in the weight stream */
#endif

/* The 16 dequantized values of a 4-bit group: (u - z) * s for u = 0 .. 15. */
AVX512 static inline __m512 int4_table(const struct layer *L, int64_t n, int64_t g) {
    const __m512 u = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float z = L->zeros ? (float)L->zeros[n * L->G + g] : 8.0f;
    return _mm512_mul_ps(_mm512_sub_ps(u, _mm512_set1_ps(z)),
                         _mm512_set1_ps(group_scale(L, n, g)));
}

/* sum_{k in [k0, k1)} w[k] * x[m, k] for the rows of x, scalar, with w the dequantized
 * 4-bit weight (u - z) * s (the tail of a group past its last whole 32-column chunk). */
static void int4_tail(const uint8_t *row, const struct layer *L, const float *x, int64_t rows,
                      int64_t n, int64_t g, int64_t k0, int64_t k1, float *dots) {
    const int z = L->zeros ? (int)L->zeros[n * L->G + g] : 8;
    const float s = group_scale(L, n, g);
    for (int64_t k = k0; k < k1; k++) {
        const int byte = row[k >> 1];
        const float w = (float)(((k & 1) ? (byte >> 4) : (byte & 0x0F)) - z) * s;
        for (int64_t m = 0; m < rows; m++) dots[m] += w * x[m * L->K + k];
    }
}

/* Columns 2i (even) and 2i + 1 (odd), i < 16, of the 32 codes in 16 bytes, dequantized. */
AVX512 static inline void int4_decode(const uint8_t *p, __m512 table, __m512 *even,
                                      __m512 *odd) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = _mm512_permutexvar_ps(v, table);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

/* One output for each of `rows` (<= MAX_ROWS) rows of x from a 4-bit row; xp: x permuted
 * in pairs. One row of x keeps four independent chains of sums, several one each. */
AVX512 static void int4_row_512(const uint8_t *row, const struct layer *L, const float *x,
                                const float *xp, int64_t rows, int64_t n, float *out) {
    const int64_t K = L->K;
    __m512 acc[MAX_ROWS] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                            _mm512_setzero_ps()};
    float rest[MAX_ROWS] = {0};
    int64_t g = 0, k0 = 0;
    if (rows == 1 && L->group == 32) /* groups of 32 two at a time: four chains, as below */
        for (; k0 + 64 <= K; g += 2, k0 += 64) {
            __m512 w[4];
            _mm_prefetch((const char *)(row + (k0 >> 1) + GEMV_PREFETCH), _MM_HINT_T0);
            int4_decode(row + (k0 >> 1), int4_table(L, n, g), &w[0], &w[1]);
            int4_decode(row + (k0 >> 1) + 16, int4_table(L, n, g + 1), &w[2], &w[3]);
            for (int j = 0; j < 4; j++)
                acc[j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(xp + k0 + 16 * j), acc[j]);
        }
    for (; k0 < K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < K ? k0 + L->group : K;
        const __m512 table = int4_table(L, n, g);
        __m512 w[4];
        int64_t k = k0;
        if (rows == 1) /* 64 columns a step, a chain for each 16 */
            for (; k + 64 <= k1; k += 64) {
                _mm_prefetch((const char *)(row + (k >> 1) + GEMV_PREFETCH), _MM_HINT_T0);
                int4_decode(row + (k >> 1), table, &w[0], &w[1]);
                int4_decode(row + (k >> 1) + 16, table, &w[2], &w[3]);
                for (int j = 0; j < 4; j++)
                    acc[j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(xp + k + 16 * j), acc[j]);
            }
        for (; k + 32 <= k1; k += 32) {
            _mm_prefetch((const char *)(row + (k >> 1) + GEMV_PREFETCH), _MM_HINT_T0);
            int4_decode(row + (k >> 1), table, &w[0], &w[1]);
            if (rows == 1) {
                acc[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xp + k), acc[0]);
                acc[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xp + k + 16), acc[1]);
            } else {
                for (int64_t m = 0; m < rows; m++) {
                    acc[m] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xp + m * K + k), acc[m]);
                    acc[m] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xp + m * K + k + 16), acc[m]);
                }
            }
        }
        if (k < k1) int4_tail(row, L, x, rows, n, g, k, k1, rest);
    }
    if (rows == 1)
        acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    for (int64_t m = 0; m < rows; m++) out[m * L->N] = _mm512_reduce_add_ps(acc[m]) + rest[m];
}

/* Four outputs n..n+3 for one row of x, in groups of whole 64-column steps (group % 64 == 0,
 * K % group == 0): a step's 64 values of x are loaded once for the four weight rows instead
 * of once a row. Each output keeps int4_row_512's four chains (one per 16 columns) and adds
 * them in its order, so the results are its bits. Each row prefetches its own position in
 * the next pass's rows (4 rows on), and into L2 only four passes on (Zen 4 EPYC, a TinyLlama
 * block's int4 g128 layers x 22 from DRAM, medians: 15.4 -> 17.6 GB/s at 2 threads, 9.0 -> 10.5
 * at 1; two passes on: 16.9 and 10.1). */
#define QUAD 4
AVX512 static void int4_quad_512(const struct layer *L, const float *xp, int64_t n,
                                 float *out) {
    const int64_t K = L->K, stride = K / 2, group = L->group;
    const uint8_t *rows = L->qweight + n * stride;
    __m512 acc[QUAD][4];
    for (int r = 0; r < QUAD; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0, k0 = 0; k0 < K; g++, k0 += group) {
        __m512 table[QUAD];
        for (int r = 0; r < QUAD; r++) table[r] = int4_table(L, n + r, g);
        for (int64_t k = k0; k < k0 + group; k += 64) {
            __m512 xs[4];
            for (int j = 0; j < 4; j++) xs[j] = _mm512_loadu_ps(xp + k + 16 * j);
            for (int r = 0; r < QUAD; r++) {
                const uint8_t *p = rows + r * stride + (k >> 1);
                _mm_prefetch((const char *)(p + QUAD * stride), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 4 * QUAD * stride), _MM_HINT_T1);
                __m512 w[4];
                int4_decode(p, table[r], &w[0], &w[1]);
                int4_decode(p + 16, table[r], &w[2], &w[3]);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(w[j], xs[j], acc[r][j]);
            }
        }
    }
    for (int r = 0; r < QUAD; r++)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                    _mm512_add_ps(acc[r][2], acc[r][3])));
}

/* `count` (QUAD, or 1 for the last rows) outputs n.. for one row of x with groups of whole
 * 128-column chunks: each row's 64 bytes of a chunk are one load, and each 32-bit lane of it
 * holds eight codes (lane d: columns 8d .. 8d + 7, column 8d + j in bits 4j .. 4j + 3).
 * vpermps reads only the low 4 bits of an index, so the lane shifted right by 4j looks up
 * column 8d + j: eight shifts, eight lookups and eight fused multiply-adds per 128 codes, with
 * no widening (int4_quad_512's pairs take a widening, a shift and two lookups per 32). xo is x
 * permuted to match (permute_octets). The shuffles bound a core: on a Zen 4 EPYC, 1 thread,
 * 44 distinct int4 g128 layers from DRAM, best of 5, GB/s of codes: 2048 x 2048 8.8 -> 11.5,
 * 2048 x 5632 11.5 -> 12.4, 5632 x 2048 11.8 -> 12.8 (the int8-activation kernel: 20-22).
 * Each output keeps four chains (column chunk 16j of a step in chain j mod 4), added as
 * int4_quad_512 adds its own. */
AVX512 static inline __attribute__((always_inline)) void
int4_octets_512(const struct layer *L, const float *xo, int64_t n, int count, float *out) {
    const int64_t K = L->K, stride = K / 2, group = L->group;
    const uint8_t *rows = L->qweight + n * stride;
    __m512 acc[QUAD][4];
    for (int r = 0; r < count; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0, k0 = 0; k0 < K; g++, k0 += group) {
        __m512 table[QUAD];
        for (int r = 0; r < count; r++) table[r] = int4_table(L, n + r, g);
        for (int64_t k = k0; k < k0 + group; k += 128) {
            __m512 xs[8];
            for (int j = 0; j < 8; j++) xs[j] = _mm512_loadu_ps(xo + k + 16 * j);
            for (int r = 0; r < count; r++) {
                const uint8_t *p = rows + r * stride + (k >> 1);
                _mm_prefetch((const char *)(p + QUAD * stride), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 4 * QUAD * stride), _MM_HINT_T1);
                const __m512i v = _mm512_loadu_si512((const void *)p);
                for (int j = 0; j < 8; j++) {
                    const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), table[r]);
                    acc[r][j & 3] = _mm512_fmadd_ps(w, xs[j], acc[r][j & 3]);
                }
            }
        }
    }
    for (int r = 0; r < count; r++)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                    _mm512_add_ps(acc[r][2], acc[r][3])));
}

AVX512 static void int4_octets_quad(const struct layer *L, const float *xo, int64_t n,
                                    float *out) {
    int4_octets_512(L, xo, n, QUAD, out);
}

AVX512 static void int4_octets_one(const struct layer *L, const float *xo, int64_t n,
                                   float *out) {
    int4_octets_512(L, xo, n, 1, out);
}

/* x (K, one row) with each 128-column chunk in the order int4_octets_512 reads its codes:
 * xo[b + 16 j + d] = x[b + 8 d + j] (K a multiple of 128). */
static void permute_octets(const float *x, int64_t K, float *xo) {
    for (int64_t b = 0; b + 128 <= K; b += 128)
        for (int64_t j = 0; j < 8; j++)
            for (int64_t d = 0; d < 16; d++) xo[b + 16 * j + d] = x[b + 8 * d + j];
}

AVX512 static inline __m512 int8_decode(const uint8_t *p) {
    const __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* One output for each of `rows` (<= MAX_ROWS) rows of x from an 8-bit row, as
 * row_dot_vector sums it: centred codes times x per group, then the group's scale. */
AVX512 static void int8_row_512(const uint8_t *row, const struct layer *L, const float *x,
                                int64_t rows, const float *xsum, int64_t n, float *out) {
    const int64_t K = L->K, G = L->G;
    __m512 total[MAX_ROWS];
    float rest[MAX_ROWS];
    for (int64_t m = 0; m < rows; m++) { total[m] = _mm512_setzero_ps(); rest[m] = 0.0f; }
    for (int64_t g = 0, k0 = 0; k0 < K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < K ? k0 + L->group : K;
        __m512 acc[MAX_ROWS] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                                _mm512_setzero_ps()};
        int64_t k = k0;
        if (rows == 1) {
            for (; k + 64 <= k1; k += 64) {
                _mm_prefetch((const char *)(row + k + GEMV_PREFETCH), _MM_HINT_T0);
                for (int j = 0; j < 4; j++)
                    acc[j] = _mm512_fmadd_ps(int8_decode(row + k + 16 * j),
                                             _mm512_loadu_ps(x + k + 16 * j), acc[j]);
            }
            acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        }
        for (; k + 16 <= k1; k += 16) {
            _mm_prefetch((const char *)(row + k + GEMV_PREFETCH), _MM_HINT_T0);
            const __m512 w = int8_decode(row + k);
            for (int64_t m = 0; m < rows; m++)
                acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
        }
        const float s = group_scale(L, n, g);
        const __m512 scaled = _mm512_set1_ps(s);
        for (int64_t m = 0; m < rows; m++) total[m] = _mm512_fmadd_ps(acc[m], scaled, total[m]);
        if (k < k1 || xsum) { /* a scalar tail, or zero points */
            const float shift = zero_shift(L, n, g);
            float tails[MAX_ROWS] = {0};
            group_dots_scalar(row, 8, x, K, rows, k, k1, tails);
            for (int64_t m = 0; m < rows; m++)
                rest[m] += s * (tails[m] + shift * (xsum ? xsum[m * G + g] : 0.0f));
        }
    }
    for (int64_t m = 0; m < rows; m++) out[m * L->N] = _mm512_reduce_add_ps(total[m]) + rest[m];
}

/* x (rows, K) with each whole 32-column chunk's even columns first, then its odd ones. */
static void permute_pairs(const float *x, int64_t rows, int64_t K, float *xp) {
    for (int64_t m = 0; m < rows; m++)
        for (int64_t b = 0; b + 32 <= K; b += 32)
            for (int64_t i = 0; i < 16; i++) {
                xp[m * K + b + i] = x[m * K + b + 2 * i];
                xp[m * K + b + 16 + i] = x[m * K + b + 2 * i + 1];
            }
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
/* 32 dequantized int4 weights from 16 bytes of a row, in column order, with AVX-512: the
 * table lookups of int4_decode, then the even and odd columns interleaved. */
AVX512 static void int4_dequant_512(const uint8_t *row, const struct layer *L, int64_t n,
                                    float *out) {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    for (int64_t g = 0, k0 = 0; k0 < L->K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < L->K ? k0 + L->group : L->K;
        const __m512 table = int4_table(L, n, g);
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) {
            __m512 even, odd;
            int4_decode(row + (k >> 1), table, &even, &odd);
            _mm512_storeu_ps(out + k, _mm512_permutex2var_ps(even, low, odd));
            _mm512_storeu_ps(out + k + 16, _mm512_permutex2var_ps(even, high, odd));
        }
        const float s = group_scale(L, n, g);
        const int z = L->zeros ? (int)L->zeros[n * L->G + g] : 8;
        for (; k < k1; k++)
            out[k] = (float)((((k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 0x0F))) - z) * s;
    }
}
#endif

/* Row n of the dequantized weight, (u - z) * s in float32, into out (K floats), scalar. */
static void dequant_row(const uint8_t *row, const struct layer *L, int64_t n, float *out) {
    for (int64_t g = 0, k0 = 0; k0 < L->K; g++, k0 += L->group) {
        const int64_t k1 = k0 + L->group < L->K ? k0 + L->group : L->K;
        const float s = group_scale(L, n, g);
        const int z = L->zeros ? (int)L->zeros[n * L->G + g] : (1 << (L->bits - 1));
        if (L->bits == 8) {
            for (int64_t k = k0; k < k1; k++) out[k] = (float)((int)row[k] - z) * s;
        } else {
            for (int64_t k = k0; k < k1; k++)
                out[k] = (float)(((k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 0x0F)) - z) * s;
        }
    }
}

/* Which float32 kernel this CPU runs: 2 = AVX-512, 1 = AVX2 (+ FMA), 0 = the scalar loop. */
int slimline_gemv_isa(void) {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
#endif
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* Outputs [n0, n1) for `rows` (<= MAX_ROWS) rows of x; xp: x permuted for the lanes
 * kernel, or NULL; xsum: (rows, G) group sums of x, or NULL without zero points. */
static void rows_block(const struct layer *L, const float *x, const float *xp, int64_t rows,
                       const float *xsum, int64_t n0, int64_t n1, float *out) {
    const int64_t row_bytes = L->K * L->bits / 8;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = L->qweight + n * row_bytes;
#ifdef __AVX2__
        row_dot_vector(row, L, x, xp, rows, xsum, n, out + n);
#else
        (void)xp;
        row_dot_scalar(row, L, x, rows, xsum, n, out + n);
#endif
    }
}

/* Group sums of x, (rows, G): what the zero points multiply. */
static void group_sums(const float *x, int64_t rows, int64_t K, int64_t group, float *xsum) {
    const int64_t G = (K + group - 1) / group;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
            float s = 0.0f;
            for (int64_t k = g * group; k < k1; k++) s += x[m * K + k];
            xsum[m * G + g] = s;
        }
}

/* out (M, N) = x (M, K) @ dequant(W)^T for bits 4 (K and group even) or 8; xsum: (M, G)
 * scratch, used when zeros is given. Returns 0, or -1 for arguments it does not handle
 * (the caller checks them first). */
int slimline_gemv(const float *x, int64_t M, int64_t K, const uint8_t *qweight, int64_t N,
                  int bits, int64_t group, const void *scales, int scale_kind,
                  const uint8_t *zeros, float *xsum, float *out, int isa) {
    const int best = slimline_gemv_isa();
    if (isa == 0) isa = best;
    if ((bits != 4 && bits != 8) || group < 1 || M < 1 || N < 1 || K < 1 || isa < 0
        || isa > best)
        return -1;
    if (bits == 4 && ((K & 1) || (group & 1)))
        return -1;
    if (zeros && !xsum)
        return -1;
    const int64_t G = (K + group - 1) / group;
    const struct layer L = {qweight, scales, zeros, N, K, group, bits, scale_kind, G};
    const int avx512 = isa == 2 && (group % 32 == 0 || G == 1); /* the AVX-512 loops below */
    /* the AVX-512 int4 loops read zero points through their tables, not the sums */
    if (zeros && !(avx512 && bits == 4))
        group_sums(x, M, K, group, xsum);
    float *xp = NULL;
#if defined(__x86_64__) || defined(_M_X64)
    if (avx512) {
        /* one row of x in groups of whole 128-column chunks: the octets' loop */
        const int octets = bits == 4 && M == 1 && group % 128 == 0 && K % group == 0;
        if (bits == 4) {
            xp = malloc((size_t)(M * K) * sizeof(float));
            if (!xp)
                return -1;
            if (octets)
                permute_octets(x, K, xp);
            else
                permute_pairs(x, M, K, xp);
        }
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            const float *xk = (xp ? xp : x) + m0 * K;
            const int64_t block = 16; /* outputs per task (a multiple of QUAD) */
            const int quad = bits == 4 && rows == 1 && group % 64 == 0 && K % group == 0;
#pragma omp parallel for schedule(static) if (N * K * rows >= PARALLEL_MIN_WORK)
            for (int64_t n0 = 0; n0 < N; n0 += block) {
                const int64_t n1 = n0 + block < N ? n0 + block : N;
                const int64_t row_bytes = K * bits / 8;
                int64_t n = n0;
                if (octets) { /* four outputs a pass, the rest one by one */
                    for (; n + QUAD <= n1; n += QUAD) int4_octets_quad(&L, xk, n, out + n);
                    for (; n < n1; n++) int4_octets_one(&L, xk, n, out + n);
                    continue;
                }
                if (quad) /* one row of x: four outputs a pass, the rest one by one */
                    for (; n + QUAD <= n1; n += QUAD) int4_quad_512(&L, xk, n, out + m0 * N + n);
                for (; n < n1; n++) {
                    const uint8_t *row = L.qweight + n * row_bytes;
                    if (bits == 4)
                        int4_row_512(row, &L, x + m0 * K, xk, rows, n, out + m0 * N + n);
                    else
                        int8_row_512(row, &L, x + m0 * K, rows, zeros ? xsum + m0 * G : NULL,
                                     n, out + m0 * N + n);
                }
            }
        }
        free(xp);
        return 0;
    }
#endif
#ifdef __AVX2__
    if (group % block_codes(bits) == 0 || G == 1) { /* the lanes kernel fits these groups */
        xp = malloc((size_t)(M * K) * sizeof(float));
        if (!xp)
            return -1;
        permute_x(x, M, K, bits, xp);
    }
#endif
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const int64_t block = 16; /* outputs per task: small, so every thread stays busy */
        /* Small layers stay on one thread: waking the others costs more than they save. */
#pragma omp parallel for schedule(static) if (N * K * rows >= PARALLEL_MIN_WORK)
        for (int64_t n0 = 0; n0 < N; n0 += block) {
            const int64_t n1 = n0 + block < N ? n0 + block : N;
            rows_block(&L, x + m0 * K, xp ? xp + m0 * K : NULL, rows,
                       zeros ? xsum + m0 * G : NULL, n0, n1, out + m0 * N);
        }
    }
    free(xp);
    return 0;
}

/* Rows [n0, n1) of the dequantized weight, (u - z) * s in float32 — packing.dequantize's
 * values bit for bit (the integer u - z, then one product with the float32 scale) — into
 * out ((n1 - n0), K): a tile for prefill-sized calls, which multiply it with a GEMM while it
 * is in cache instead of dequantizing the whole layer through torch. bits 4 (K and group
 * even) or 8; isa as slimline_gemv's (AVX-512: int4 groups of whole 32-column chunks by table
 * lookup). Returns 0, or -1 for arguments it does not handle. */
int slimline_dequant_rows(const uint8_t *qweight, int64_t N, int64_t K, int bits,
                          int64_t group, const void *scales, int scale_kind,
                          const uint8_t *zeros, int64_t n0, int64_t n1, float *out, int isa) {
    const int best = slimline_gemv_isa();
    if (isa == 0) isa = best;
    if ((bits != 4 && bits != 8) || group < 1 || N < 1 || K < 1 || n0 < 0 || n1 > N
        || n0 >= n1 || isa < 0 || isa > best)
        return -1;
    if (bits == 4 && ((K & 1) || (group & 1)))
        return -1;
    const int64_t G = (K + group - 1) / group;
    const struct layer L = {qweight, scales, zeros, N, K, group, bits, scale_kind, G};
    const int64_t row_bytes = K * bits / 8;
    const int vector = isa == 2 && bits == 4 && (group % 32 == 0 || G == 1);
#pragma omp parallel for schedule(static) if ((n1 - n0) * K >= PARALLEL_MIN_WORK)
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + (n - n0) * K;
#if defined(__x86_64__) || defined(_M_X64)
        if (vector) {
            int4_dequant_512(qweight + n * row_bytes, &L, n, o);
            continue;
        }
#endif
        dequant_row(qweight + n * row_bytes, &L, n, o);
    }
    (void)vector;
    return 0;
}
