// AVX2 + FMA row kernels with float32 activations (see gemv_f32.cpp).
#include "f32.h"
#include "simd.h"

namespace moecpu {

namespace {

// T tokens at once, a compile-time count so that the 2*T accumulators (two independent FMA chains per
// token, 16 codes per step) stay in registers.
// Block decoding for 4- and 2-bit codes: 8 bytes widened to 8 int32 lanes hold 16 (or 32) codes, taken out by
// shifts without a per-lane variable shift. The lanes then hold codes in a strided order (4-bit: even codes,
// then odd; 2-bit: code 4j+s in segment s), so `xp` is x permuted the same way per block (`permute_x`).
template <int T>
__attribute__((target("avx2,fma,f16c"))) inline void block4(const uint8_t* row, int64_t k, const float* xp, int64_t K,
                                                       __m256* a, __m256* b) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + k / 2)));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    for (int t = 0; t < T; ++t) {
        a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + t * K + k), lo, a[t]);
        b[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + t * K + k + 8), hi, b[t]);
    }
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) inline void block2(const uint8_t* row, int64_t k, const float* xp, int64_t K,
                                                       __m256* a, __m256* b) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + k / 4)));
    const __m256i m = _mm256_set1_epi32(3);
    const __m256 c0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, m));
    const __m256 c1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2), m));
    const __m256 c2 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), m));
    const __m256 c3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 6));
    for (int t = 0; t < T; ++t) {
        const float* xt = xp + t * K + k;
        a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt), c0, a[t]);
        b[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8), c1, b[t]);
        a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 16), c2, a[t]);
        b[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 24), c3, b[t]);
    }
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void row_avx2(const ProjDesc& d, int n, const float* x, const float* xp,
                                                  const float* xsum, float* y, int ldy) {
    const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
    const int srow = d.scale_rows == 1 ? 0 : n, bits = d.bits;
    const int64_t K = d.in_features;
    const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    float out[T];
    __m256 tot[T];
    for (int t = 0; t < T; ++t) out[t] = 0.f, tot[t] = _mm256_setzero_ps();
    for (int g = 0; g < d.groups; ++g) {
        const int64_t k0 = (int64_t)g * d.group, k1 = k0 + d.group < K ? k0 + d.group : K;
        __m256 a[T], b[T];
        for (int t = 0; t < T; ++t) a[t] = b[t] = _mm256_setzero_ps();
        int64_t k = k0;
        if (xp != nullptr && bits == 4)
            for (; k + 16 <= k1; k += 16) block4<T>(row, k, xp, K, a, b);
        else if (xp != nullptr && bits == 2)
            for (; k + 32 <= k1; k += 32) block2<T>(row, k, xp, K, a, b);
        for (; k + 16 <= k1; k += 16) {
            const __m256 q0 = decode8(row, d.row_bytes, k, bits, shifts, mask);
            const __m256 q1 = decode8(row, d.row_bytes, k + 8, bits, shifts, mask);
            for (int t = 0; t < T; ++t) {
                a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k), q0, a[t]);
                b[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k + 8), q1, b[t]);
            }
        }
        for (; k + 8 <= k1; k += 8) {
            const __m256 q0 = decode8(row, d.row_bytes, k, bits, shifts, mask);
            for (int t = 0; t < T; ++t) a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k), q0, a[t]);
        }
        // scale the group's vector sums into the row's (no horizontal sum per group)
        const float s = _cvtsh_ss(d.scale[(int64_t)srow * d.groups + g]);
        const float z = zero_of(d, n, g);
        const __m256 vs = _mm256_set1_ps(s);
        for (int t = 0; t < T; ++t) {
            tot[t] = _mm256_fmadd_ps(vs, _mm256_add_ps(a[t], b[t]), tot[t]);
            float tail = 0.f;
            for (int64_t j = k; j < k1; ++j) tail += x[t * K + j] * (float)code_at(row, j, bits);
            out[t] += s * (tail - z * xsum[(int64_t)t * d.groups + g]);
        }
    }
    for (int t = 0; t < T; ++t) y[(int64_t)t * ldy + n] = out[t] + hsum8(tot[t]);
}

const RowFn kRowAvx2[kMaxTokens + 1] = {nullptr, row_avx2<1>, row_avx2<2>, row_avx2<3>, row_avx2<4>,
                                        row_avx2<5>, row_avx2<6>, row_avx2<7>, row_avx2<8>};

}  // namespace

const RowFn* f32_rows_avx2() { return kRowAvx2; }

}  // namespace moecpu
