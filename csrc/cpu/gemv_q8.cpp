// Decode kernels with int8 activations (AVX-512 VNNI + VBMI), in the manner of llama.cpp's q8 dot products.
// Each token's activations are quantized per block of 16 values (scale d = max |x| / 127, round half to even);
// one vpdpbusd then multiplies 64 weight codes (unsigned bytes) with 64 activations and sums them in fours:
// 64 multiply-adds per instruction against 16 for a float FMA, and the codes never become floats.
//
// A chunk is what one 512-bit load of a row decodes: C codes in 16 int32 lanes of L = C / 16 consecutive codes
// (2-bit: 256 codes from 64 bytes, 4-bit: 128 from 64, 8-bit: 64 from 64, 3-bit: 64 from 24). 4- and 2-bit
// chunks are split by shifts and masks into P parts of 64 byte-wide codes, part p byte j holding code P * j + p;
// the activations are stored in that order (q8_quantize). 3-bit chunks are spread by a VBMI byte permute and
// multishift and keep their natural order. A lane's codes lie in one activation block (L divides 16) and one
// weight group (16 divides the group), so each lane's int32 sum is scaled once:
//
//   y[t, n] = sum_chunks sum_lanes scale_lane * d_lane * isum_lane - sum_g scale_g * zero_g * xsum[t, g]
//
// with xsum[t, g] the group's sum of d * int8 activations. Against float activations this adds the rounding
// error of the activations (about 0.3 % relative per projection on Gaussian inputs); against a float64
// reference computed from the same int8 activations it is exact to float32 rounding.
//
// This file: the activations' quantization and layout, and the dispatch by the traits table below; the row kernels
// of each ISA are in gemv_q8_avx512.cpp and gemv_q8_avx2.cpp.
#include <math.h>

#include <algorithm>
#include <vector>

#include "q8.h"
#include "simd.h"

namespace moecpu {

namespace {

constexpr int kBlock = kQ8Block;

// The int8 kernels' traits table, one column per ISA (as ggml-cpu's type_traits_cpu, one row per code width in
// each ISA file): this CPU's row kernels for `bits`-wide codes, or null (the width runs on the float32 kernels).
const RowsFn* q8_kernels(int bits) {
    if (has_q8()) return q8_rows_avx512(bits);
    if (has_avx2()) return q8_rows_avx2(bits, has_avxvnni());
    return nullptr;
}

}  // namespace

Q8Layout q8_layout(int bits) {
    if (has_q8()) return {chunk_codes(bits), 64};
    return {32 * 8 / bits, 32};
}

int q8_layout_id(Q8Layout layout) {
    const int base = layout.part == 64 ? 0 : 3, smallest = layout.part == 64 ? 64 : 32;
    return base + (layout.chunk == smallest ? 0 : layout.chunk == 2 * smallest ? 1 : 2);
}

bool q8_fits(const ProjDesc& d) {
    if (q8_kernels(d.bits) == nullptr) return false;
    const int C = q8_layout(d.bits).chunk;
    return d.groups == 1 || (d.group % kBlock == 0 && (d.group % C == 0 || C % d.group == 0));
}

size_t q8_dvec_floats(int64_t K, Q8Layout layout) { return (size_t)(chunks_of(K, layout.chunk) * (layout.part / 4)); }

size_t q8_act_floats(int64_t K, Q8Layout layout) { return q8_dvec_floats(K, layout) + (size_t)((K + kBlock - 1) / kBlock); }

// One block's int8 values q[i] = round(x[i] / scale) (half to even), scale = max |x| / 127; returns the scale.
static float quantize_block(const float* x, int n, int32_t* q) {
    float amax = 0.f;
    for (int i = 0; i < n; ++i) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;  // no libm call per value
    const float scale = amax / 127.f;
    for (int i = 0; i < n; ++i) {
        // |x / scale| <= 127: adding and subtracting 1.5 * 2^23 rounds it half to even, as nearbyintf
        const float v = scale > 0.f ? x[i] / scale : 0.f;
        q[i] = (int32_t)((v + 12582912.f) - 12582912.f);
    }
    return scale;
}

// A whole block of 16 with AVX2, the same IEEE division and rounding as quantize_block, so the same values: its
// int8 values grouped by k % P (P runs of 16 / P bytes, as the layout's parts take them) into `runs`; returns the
// scale and (sum) the values' sum.
static __attribute__((target("avx2"))) float quantize_block16_avx2(const float* x, int P, int8_t* runs, int32_t* sum) {
    const __m256 sign = _mm256_set1_ps(-0.f), a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float scale = _mm_cvtss_f32(h) / 127.f;
    if (!(scale > 0.f)) {
        memset(runs, 0, kBlock);
        *sum = 0;
        return scale;
    }
    const __m256 s = _mm256_set1_ps(scale);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i qa = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(a, s), kRound));
    const __m256i qb = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(b, s), kRound));
    const __m256i q = _mm256_add_epi32(qa, qb);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    *sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xd8);  // 16 int16 in order
    const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    static const int8_t kByPart[3][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
                                          {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15},
                                          {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15}};
    const __m128i order = _mm_loadu_si128((const __m128i*)kByPart[P == 1 ? 0 : P == 2 ? 1 : 2]);
    _mm_storeu_si128((__m128i*)runs, _mm_shuffle_epi8(bytes, order));
    return scale;
}

// Portable (every ISA takes the same activations): scale = max|x| / 127, round half to even, per block of 16;
// the values go where the layout's chunk decoder yields their codes (part k % P, byte k / P of the chunk).
void q8_quantize(const float* x, int64_t K, Q8Layout layout, int8_t* xq, float* dvec, float* bsum) {
    const int C = layout.chunk, P = C / layout.part > 0 ? C / layout.part : 1, L = C / (layout.part / 4);
    const int shift = __builtin_ctz((unsigned)P);  // C and P are powers of two: no division per value
    const int64_t chunks = chunks_of(K, C), blocks = (K + kBlock - 1) / kBlock;
    const bool avx2 = has_avx2() && P <= 4;
    memset(xq + (K / C) * C, 0, (size_t)((chunks - K / C) * C));  // a partial last chunk's padding
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlock, j0 = k0 & (C - 1);
        const int n = K - k0 < kBlock ? (int)(K - k0) : kBlock;
        float scale;
        int32_t sum = 0;
        if (avx2 && n == kBlock) {  // P runs of 16 / P values: run p to part p from byte j0 / P
            alignas(16) int8_t runs[kBlock];
            scale = quantize_block16_avx2(x + k0, P, runs, &sum);
            for (int p = 0; p < P; ++p) memcpy(xq + (k0 - j0) + p * layout.part + (j0 >> shift), runs + p * (kBlock / P), kBlock / P);
        } else {
            int32_t q[kBlock];
            scale = quantize_block(x + k0, n, q);
            for (int i = 0; i < n; ++i) {
                const int64_t j = (k0 + i) & (C - 1);
                xq[(k0 + i - j) + (j & (P - 1)) * layout.part + (j >> shift)] = (int8_t)q[i];
                sum += q[i];
            }
        }
        bsum[b] = scale * (float)sum;
        for (int64_t k = k0; k < k0 + kBlock; k += L) dvec[k / L] = scale;  // the block's lanes
    }
    for (int64_t i = (K + L - 1) / L; i < (int64_t)q8_dvec_floats(K, layout); ++i) dvec[i] = 0.f;  // past the row
}

void q8_group_sums(const ProjDesc& d, const QAct* a, int T, float* xsum) {
    const int64_t blocks = (d.in_features + kBlock - 1) / kBlock;
    const int64_t per = d.groups == 1 ? blocks : d.group / kBlock;
    for (int t = 0; t < T; ++t)
        for (int g = 0; g < d.groups; ++g) {
            float s = 0.f;
            for (int64_t b = g * per; b < (g + 1) * per && b < blocks; ++b) s += a[t].bsum[b];
            xsum[t * d.groups + g] = s;
        }
}

void q8_rows(const ProjDesc& d, int n0, int n1, const QAct* a, const float* xsum, int T, float* y, int64_t ldy) {
    q8_kernels(d.bits)[T](d, n0, n1, a, xsum, y, ldy);
}

}  // namespace moecpu
