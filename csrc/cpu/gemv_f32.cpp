// Decode kernels with float32 activations: group-wise dequant GEMV over the stored bit streams (packed.h), exact
// to float32 rounding. Never a float copy of a weight: each row is decoded 8 codes at a time into registers and
// used for every token of the call. AVX-512 (F/BW/VL) or AVX2+FMA code is chosen at run time when the CPU has it
// (MOECOMPRESS_NO_AVX512=1 stops at AVX2); a portable path otherwise.
//
// This file: the portable row kernel and the dispatch; the AVX2 and AVX-512 kernels are gemv_f32_avx2.cpp and
// gemv_f32_avx512.cpp, the shared decoding and traits table f32.h.
#include <vector>

#include "f32.h"

namespace moecpu {

int block_codes(const ProjDesc& d, int lanes) {
    const F32Traits t = d.bits >= 0 && d.bits <= 8 ? kF32Traits[d.bits] : F32Traits{};
    const int block = lanes * (lanes == 16 ? t.avx512 : t.avx2);
    return block && d.group % block == 0 ? block : 0;
}

// Lane j of segment s holds code per_byte * j + s.
void permute_x(const float* x, int T, int64_t K, int block, int lanes, float* xp) {
    const int per_byte = block / lanes;
    for (int t = 0; t < T; ++t) {
        const float* xt = x + t * K;
        float* pt = xp + t * K;
        const int64_t whole = K / block * block;
        for (int64_t k0 = 0; k0 < whole; k0 += block)
            for (int s = 0; s < per_byte; ++s)
                for (int j = 0; j < lanes; ++j) pt[k0 + s * lanes + j] = xt[k0 + per_byte * j + s];
        for (int64_t k = whole; k < K; ++k) pt[k] = xt[k];
    }
}

namespace {

// Portable row kernel, unit by unit with the decoder the CUDA kernels use: acc[t] = sum over the row's groups
// as in the header formula.
void row_scalar(const ProjDesc& d, int n, const float* x, int T, const float* xsum, float* y, int ldy) {
    const uint32_t* row = (const uint32_t*)(d.packed + (int64_t)n * d.row_bytes);
    const int srow = d.scale_rows == 1 ? 0 : n;
    const int64_t K = d.in_features, row_words = d.row_bytes / 4;
    float dot[kMaxTokens] = {0}, acc[kMaxTokens] = {0};
    uint32_t w[8];
    for (int64_t u = 0; u * kUnitCodes < K; ++u) {
        moe_load_unit(row, row_words, u, d.bits, w);
        for (int i = 0; i < kUnitCodes && u * kUnitCodes + i < K; ++i) {
            const int64_t k = u * kUnitCodes + i;
            const float q = (float)moe_unit_code(w, i, d.bits);
            for (int t = 0; t < T; ++t) dot[t] += x[(int64_t)t * K + k] * q;
            if ((k + 1) % d.group == 0 || k + 1 == K) {  // the group ends: scale its sums into the row's
                const int g = (int)(k / d.group);
                const float s = half_to_float(d.scale[(int64_t)srow * d.groups + g]), z = zero_of(d, n, g);
                for (int t = 0; t < T; ++t) acc[t] += s * (dot[t] - z * xsum[(int64_t)t * d.groups + g]), dot[t] = 0.f;
            }
        }
    }
    for (int t = 0; t < T; ++t) y[(int64_t)t * ldy + n] = acc[t];
}

// y[T, out] = x[T, in] W^T for T <= kMaxTokens.
void gemv(const ProjDesc& d, const float* x, int T, float* y) {
    std::vector<float> xsum((size_t)T * d.groups, 0.f);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < d.in_features; ++k) xsum[(size_t)t * d.groups + k / d.group] += x[(int64_t)t * d.in_features + k];
    const int lanes = has_avx512() ? 16 : has_avx2() ? 8 : 0;
    const RowFn avx2 = lanes == 16 ? f32_rows_avx512()[T] : lanes == 8 ? f32_rows_avx2()[T] : nullptr;
    const int block = avx2 ? block_codes(d, lanes) : 0;
    std::vector<float> xp(block ? (size_t)T * d.in_features : 0);
    if (block) permute_x(x, T, d.in_features, block, lanes, xp.data());
    const float* xpp = block ? xp.data() : nullptr;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < d.out_features; ++n) {
        if (avx2)
            avx2(d, n, x, xpp, xsum.data(), y, d.out_features);
        else
            row_scalar(d, n, x, T, xsum.data(), y, d.out_features);
    }
}

// y[T, out] = x[T, in] W^T for any T: 8 tokens per pass over the codes, or (AVX-512, more than 8 tokens) each
// row dequantized once for all of them.
void project(const ProjDesc& d, const float* x, int64_t T, float* y) {
    if (T > kMaxTokens && has_avx512()) return f32_gemm_avx512(d, x, T, y);
    for (int64_t t0 = 0; t0 < T; t0 += kMaxTokens) {
        const int n = (int)(T - t0 < kMaxTokens ? T - t0 : kMaxTokens);
        gemv(d, x + t0 * d.in_features, n, y + t0 * d.out_features);
    }
}

}  // namespace

void project_f32(const ProjDesc& d, const float* x, int64_t T, float* y) { project(d, x, T, y); }

}  // namespace moecpu
