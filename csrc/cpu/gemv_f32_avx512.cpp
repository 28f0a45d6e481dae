// AVX-512 (F/BW/VL) kernels with float32 activations: rows for up to 8 tokens, and the prefill GEMM (each row
// dequantized once into an L1 buffer); see gemv_f32.cpp.
#include <vector>

#include "dense_tile.h"
#include "f32.h"
#include "simd.h"

namespace moecpu {

namespace {

// The same block decoders as AVX2 with 16 lanes (4-bit: 16 bytes -> 32 codes; 2-bit: 64 codes; 8-bit: 16),
// then the AVX2 code for what is left of a group (3-bit codes, tails).
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

AVX512_TARGET inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int T>
AVX512_TARGET void row_avx512(const ProjDesc& d, int n, const float* x, const float* xp, const float* xsum, float* y,
                              int ldy) {
    const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
    const int srow = d.scale_rows == 1 ? 0 : n, bits = d.bits;
    const int64_t K = d.in_features;
    const int block = xp != nullptr ? 16 * kF32Traits[bits].avx512 : 0;
    const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    float out[T];
    __m512 tot[T];
    __m256 ctot[T];
    for (int t = 0; t < T; ++t) out[t] = 0.f, tot[t] = _mm512_setzero_ps(), ctot[t] = _mm256_setzero_ps();
    for (int g = 0; g < d.groups; ++g) {
        const int64_t k0 = (int64_t)g * d.group, k1 = k0 + d.group < K ? k0 + d.group : K;
        __m512 a[T], b[T];
        __m256 c[T];
        for (int t = 0; t < T; ++t) a[t] = b[t] = _mm512_setzero_ps(), c[t] = _mm256_setzero_ps();
        int64_t k = k0;
        if (block)
            for (; k + block <= k1; k += block) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + k * bits / 8)));
                if (bits == 8) {
                    const __m512 q = _mm512_cvtepi32_ps(v);
                    for (int t = 0; t < T; ++t) a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + t * K + k), q, a[t]);
                } else if (bits == 4) {
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                    for (int t = 0; t < T; ++t) {
                        a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + t * K + k), lo, a[t]);
                        b[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + t * K + k + 16), hi, b[t]);
                    }
                } else {
                    const __m512i m = _mm512_set1_epi32(3);
                    const __m512 c0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, m));
                    const __m512 c1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 2), m));
                    const __m512 c2 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4), m));
                    const __m512 c3 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 6));
                    for (int t = 0; t < T; ++t) {
                        const float* xt = xp + t * K + k;
                        a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt), c0, a[t]);
                        b[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 16), c1, b[t]);
                        a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 32), c2, a[t]);
                        b[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 48), c3, b[t]);
                    }
                }
            }
        if (bits == 3 && (k & 7) == 0) {  // 16 codes = two 3-byte words, one per 256-bit half, natural order
            const __m512i sh3 = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
            for (; k + 16 <= k1 && k * 3 / 8 + 8 <= d.row_bytes; k += 16) {
                uint32_t w0, w1;
                memcpy(&w0, row + k * 3 / 8, 4);
                memcpy(&w1, row + k * 3 / 8 + 3, 4);
                const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)w0)),
                                                     _mm256_set1_epi32((int)w1), 1);
                const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh3), _mm512_set1_epi32(7)));
                for (int t = 0; t < T; ++t) a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * K + k), q, a[t]);
            }
        }
        for (; k + 8 <= k1; k += 8) {
            const __m256 q = decode8(row, d.row_bytes, k, bits, shifts, mask);
            for (int t = 0; t < T; ++t) c[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k), q, c[t]);
        }
        const float s = _cvtsh_ss(d.scale[(int64_t)srow * d.groups + g]);
        const float z = zero_of(d, n, g);
        const __m512 vs = _mm512_set1_ps(s);
        for (int t = 0; t < T; ++t) {
            tot[t] = _mm512_fmadd_ps(vs, _mm512_add_ps(a[t], b[t]), tot[t]);
            ctot[t] = _mm256_fmadd_ps(_mm512_castps512_ps256(vs), c[t], ctot[t]);
            float tail = 0.f;
            for (int64_t j = k; j < k1; ++j) tail += x[t * K + j] * (float)code_at(row, j, bits);
            out[t] += s * (tail - z * xsum[(int64_t)t * d.groups + g]);
        }
    }
    for (int t = 0; t < T; ++t) y[(int64_t)t * ldy + n] = out[t] + hsum512(tot[t]) + hsum8(ctot[t]);
}

const RowFn kRowAvx512[kMaxTokens + 1] = {nullptr, row_avx512<1>, row_avx512<2>, row_avx512<3>, row_avx512<4>,
                                          row_avx512<5>, row_avx512<6>, row_avx512<7>, row_avx512<8>};

// Many tokens (prefill): each row is dequantized once into an L1 buffer (w = scale * (q - zero), blocks in the
// permuted order of `permute_x`) and then dotted with every token, 4 at a time; AVX-512 only.
AVX512_TARGET void dequant_row(const ProjDesc& d, int n, int block, float* w) {
    const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
    const int srow = d.scale_rows == 1 ? 0 : n, bits = d.bits;
    const int64_t K = d.in_features;
    const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    for (int g = 0; g < d.groups; ++g) {
        const int64_t k0 = (int64_t)g * d.group, k1 = k0 + d.group < K ? k0 + d.group : K;
        const float s = _cvtsh_ss(d.scale[(int64_t)srow * d.groups + g]);
        const float z = zero_of(d, n, g);
        const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
        int64_t k = k0;
        if (block)
            for (; k + block <= k1; k += block) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + k * bits / 8)));
                const int parts = block / 16, step = 8 / parts;  // codes per byte, and bits per code
                for (int p = 0; p < parts; ++p) {
                    __m512i c = _mm512_srli_epi32(v, p * step);
                    if (parts > 1) c = _mm512_and_si512(c, _mm512_set1_epi32((1 << step) - 1));
                    _mm512_storeu_ps(w + k + 16 * p, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), vz), vs));
                }
            }
        for (; k + 8 <= k1; k += 8) {
            const __m256 q = decode8(row, d.row_bytes, k, bits, shifts, mask);
            _mm256_storeu_ps(w + k, _mm256_mul_ps(_mm256_sub_ps(q, _mm512_castps512_ps256(vz)), _mm512_castps512_ps256(vs)));
        }
        for (; k < k1; ++k) w[k] = s * ((float)code_at(row, k, bits) - z);
    }
}

template <int R>
AVX512_TARGET void dot_rows(const float* w, const float* x, int64_t K, int64_t T, float* y, int ldy) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) tile_avx512<false, R, 4>(w, K, x + t * K, K, y + t * ldy, ldy);
    for (; t < T; ++t) tile_avx512<false, R, 1>(w, K, x + t * K, K, y + t * ldy, ldy);
}

AVX512_TARGET void gemm_rows_impl(const ProjDesc& d, const float* x, int64_t T, float* y) {
    constexpr int kRows = 4;
    const int64_t K = d.in_features;
    const int block = block_codes(d, 16);
    std::vector<float> xp(block ? (size_t)T * K : 0);
    if (block) permute_x(x, (int)T, K, block, 16, xp.data());
    const float* xq = block ? xp.data() : x;
    const int tiles = (d.out_features + kRows - 1) / kRows;
#pragma omp parallel
    {
        std::vector<float> w((size_t)kRows * K);
#pragma omp for schedule(static)
        for (int tile = 0; tile < tiles; ++tile) {
            const int n0 = tile * kRows, rows = d.out_features - n0 < kRows ? d.out_features - n0 : kRows;
            for (int r = 0; r < rows; ++r) dequant_row(d, n0 + r, block, w.data() + r * K);
            if (rows == kRows)
                dot_rows<kRows>(w.data(), xq, K, T, y + n0, d.out_features);
            else
                for (int r = 0; r < rows; ++r) dot_rows<1>(w.data() + r * K, xq, K, T, y + n0 + r, d.out_features);
        }
    }
}

}  // namespace

const RowFn* f32_rows_avx512() { return kRowAvx512; }

void f32_gemm_avx512(const ProjDesc& d, const float* x, int64_t T, float* y) { gemm_rows_impl(d, x, T, y); }

}  // namespace moecpu
