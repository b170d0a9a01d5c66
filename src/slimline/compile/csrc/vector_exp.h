/* e^x in eight float32 lanes for x <= 0: a softmax after its maximum is taken off, silu's
 * e^-|g|. Shared by decode_block.c and varlen_attention.c.
 *
 * Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two constants, so the
 * reduction is exact to float32), e^r = 1 + r + r^2 P(r) with P its degree-5 minimax
 * polynomial (~1 ulp), times 2^n built in the exponent bits. x below -87.34 (e^x < 2^-126) is
 * taken as -87.34; NaN stays NaN (maxps returns its second operand when one is NaN).
 */
#ifndef SLIMLINE_VECTOR_EXP_H
#define SLIMLINE_VECTOR_EXP_H

#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline __m256 slimline_exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif
