// The dense AVX-512 tile shared by the dense GEMV (dense.cpp: float32 or bfloat16 weights) and the dequantize-then-
// multiply prefill path of the packed kernels (gemv_f32.cpp: float32 rows dequantized into a buffer).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace moecpu {

#define DENSE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

template <bool BF16>
inline float weight_at(const void* row, int64_t k) {
    if constexpr (BF16) {
        const uint32_t bits = (uint32_t)((const uint16_t*)row)[k] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    } else {
        return ((const float*)row)[k];
    }
}

template <bool BF16>
DENSE_AVX512 inline __m512 load16(const void* row, int64_t k) {
    if constexpr (BF16) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)row + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        return _mm512_loadu_ps((const float*)row + k);
    }
}

// A tile of y: R consecutive rows (stride `ld` elements) for T tokens, one accumulator per (row, token), so each
// activation load serves R rows and each weight load T tokens (the activations stay in L1/L2; the weights stream);
// y[t, r] goes to out[t * ldo + r].
template <bool BF16, int R, int T>
DENSE_AVX512 void tile_avx512(const void* w, int64_t ld, const float* x, int64_t K, float* out,
                              int64_t ldo) {
    using W = std::conditional_t<BF16, uint16_t, float>;
    const W* rows = (const W*)w;
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + t * K + k);
        for (int r = 0; r < R; ++r) {
            const __m512 wv = load16<BF16>(rows + r * ld, k);
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(xv[t], wv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float tail = 0.f;
            for (int64_t j = k; j < K; ++j) tail += weight_at<BF16>(rows + r * ld, j) * x[t * K + j];
            out[t * ldo + r] = _mm512_reduce_add_ps(acc[r][t]) + tail;
        }
}

}  // namespace moecpu
