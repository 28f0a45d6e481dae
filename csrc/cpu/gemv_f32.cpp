// Decode kernels with float32 activations: group-wise dequant GEMV over the stored bit streams (packed.h), exact
// to float32 rounding. Never a float copy of a weight: each row is decoded 8 codes at a time into registers and
// used for every token of the call. AVX-512 (F/BW/VL) or AVX2+FMA code is chosen at run time when the CPU has it
// (MOECOMPRESS_NO_AVX512=1 stops at AVX2); a portable path otherwise.
#include <vector>

#include "dense_tile.h"
#include "packed.h"
#include "simd.h"

namespace moecpu {

namespace {

// Eight consecutive codes starting at code k of a row (bits <= 4): the low 8*bits bits of the result.
inline uint32_t window(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
    const int64_t bit = k * bits, byte = bit >> 3;
    uint64_t w = 0;
    if (byte + 8 <= row_bytes)
        memcpy(&w, row + byte, 8);  // one unaligned load
    else
        memcpy(&w, row + byte, (size_t)(row_bytes - byte));  // the row's last bytes: never read past it
    return (uint32_t)(w >> (bit & 7));
}

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

__attribute__((target("avx2,fma,f16c"))) inline __m256 decode8(const uint8_t* row, int64_t row_bytes, int64_t k, int bits,
                                                           __m256i shifts, __m256i mask) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + k))));
    uint32_t w;
    if (bits == 3 && (k & 7) == 0 && k * 3 / 8 + 4 <= row_bytes)
        memcpy(&w, row + k * 3 / 8, 4);  // 8 three-bit codes are 3 whole bytes: no shift
    else
        w = window(row, row_bytes, k, bits);
    const __m256i codes = _mm256_srlv_epi32(_mm256_set1_epi32((int)w), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(codes, mask));
}

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

// Codes per block of the fast path for this projection with `lanes` floats per vector (8: AVX2, 16: AVX-512),
// or 0 (no block decoder for these bits, or groups that split a block).
int block_codes(const ProjDesc& d, int lanes) {
    const bool wide = lanes == 16;
    const int block = d.bits == 4 ? 2 * lanes : d.bits == 2 ? 4 * lanes : (d.bits == 8 && wide) ? lanes : 0;
    return block && d.group % block == 0 ? block : 0;
}

// xp[t, k]: x reordered within each whole block as the block decoders read it (tail columns unchanged):
// lane j of segment s holds code per_byte * j + s.
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

using RowFn = void (*)(const ProjDesc&, int, const float*, const float*, const float*, float*, int);
const RowFn kRowAvx2[kMaxTokens + 1] = {nullptr, row_avx2<1>, row_avx2<2>, row_avx2<3>, row_avx2<4>,
                                        row_avx2<5>, row_avx2<6>, row_avx2<7>, row_avx2<8>};

// AVX-512: the same block decoders with 16 lanes (4-bit: 16 bytes -> 32 codes; 2-bit: 64 codes; 8-bit: 16),
// then the AVX2 code for what is left of a group (3-bit codes, tails).
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

AVX512_TARGET inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int T>
AVX512_TARGET void row_avx512(const ProjDesc& d, int n, const float* x, const float* xp, const float* xsum, float* y,
                              int ldy) {
    const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
    const int srow = d.scale_rows == 1 ? 0 : n, bits = d.bits;
    const int64_t K = d.in_features;
    const int block = xp != nullptr ? (bits == 4 ? 32 : bits == 2 ? 64 : 16) : 0;
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

// y[T, out] = x[T, in] W^T for T <= kMaxTokens.
void gemv(const ProjDesc& d, const float* x, int T, float* y) {
    std::vector<float> xsum((size_t)T * d.groups, 0.f);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < d.in_features; ++k) xsum[(size_t)t * d.groups + k / d.group] += x[(int64_t)t * d.in_features + k];
    const int lanes = has_avx512() ? 16 : has_avx2() ? 8 : 0;
    const RowFn avx2 = lanes == 16 ? kRowAvx512[T] : lanes == 8 ? kRowAvx2[T] : nullptr;
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

AVX512_TARGET void gemm_rows(const ProjDesc& d, const float* x, int64_t T, float* y) {
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

// y[T, out] = x[T, in] W^T for any T: 8 tokens per pass over the codes, or (AVX-512, more than 8 tokens) each
// row dequantized once for all of them.
void project(const ProjDesc& d, const float* x, int64_t T, float* y) {
    if (T > kMaxTokens && has_avx512()) return gemm_rows(d, x, T, y);
    for (int64_t t0 = 0; t0 < T; t0 += kMaxTokens) {
        const int n = (int)(T - t0 < kMaxTokens ? T - t0 : kMaxTokens);
        gemv(d, x + t0 * d.in_features, n, y + t0 * d.out_features);
    }
}

}  // namespace

void project_f32(const ProjDesc& d, const float* x, int64_t T, float* y) { project(d, x, T, y); }

}  // namespace moecpu
