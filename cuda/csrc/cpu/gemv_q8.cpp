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
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 flags _mm512_undefined_* inside its own headers
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <vector>

#include "packed.h"

namespace moecpu {

namespace {

constexpr int kBlock = 16;  // activations per int8 scale
// Bytes ahead of the chunk being decoded that are prefetched: the hardware prefetchers stop at 4 KiB pages,
// and one expert's rows are not in huge pages.
#ifndef MOE_PREFETCH
#define MOE_PREFETCH 4096
#endif
constexpr int kPrefetch = MOE_PREFETCH;

#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))

constexpr int chunk_codes(int bits) { return bits == 2 ? 256 : bits == 4 ? 128 : 64; }
constexpr int chunk_bytes(int bits) { return chunk_codes(bits) * bits / 8; }
constexpr int chunk_parts(int bits) { return bits == 2 ? 4 : bits == 4 ? 2 : 1; }

int64_t chunks_of(int64_t K, int C) { return (K + C - 1) / C; }

template <int BITS>
Q8_TARGET inline void decode_chunk(const uint8_t* p, __mmask64 m, __m512i* part) {
    const __m512i v = _mm512_maskz_loadu_epi8(m, p);
    if (BITS == 8) {
        part[0] = v;
    } else if (BITS == 3) {  // qword q <- bytes 3q .. 3q+7; byte j of it <- bits 3j .. 3j+7 (code 8q + j)
        const __m512i idx = _mm512_set_epi8(28, 27, 26, 25, 24, 23, 22, 21, 25, 24, 23, 22, 21, 20, 19, 18, 22, 21,
                                            20, 19, 18, 17, 16, 15, 19, 18, 17, 16, 15, 14, 13, 12, 16, 15, 14, 13, 12,
                                            11, 10, 9, 13, 12, 11, 10, 9, 8, 7, 6, 10, 9, 8, 7, 6, 5, 4, 3, 7, 6, 5,
                                            4, 3, 2, 1, 0);
        const __m512i shifts = _mm512_set1_epi64(0x15120f0c09060300LL);  // 0, 3, ..., 21
        part[0] = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(idx, v)),
                                   _mm512_set1_epi8(7));
    } else {
        const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
        for (int s = 0; s < 8 / BITS; ++s) part[s] = _mm512_and_si512(_mm512_srli_epi16(v, s * BITS), mask);
    }
}

// Lane -> group of a chunk that holds several groups (C % group == 0).
Q8_TARGET inline __m512i lane_groups(int L, int group) {
    alignas(64) int32_t v[16];
    for (int i = 0; i < 16; ++i) v[i] = i * L / group;
    return _mm512_load_si512(v);
}

inline __mmask16 first(int count) { return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1); }

// tot[t] -= sum_g scale_g * zero_g * xsum[t, g], 16 groups at a time.
template <int T>
Q8_TARGET inline void zero_points(const ProjDesc& d, int n, const uint16_t* srow, const float* xsum, __m512* tot) {
    const int G = d.groups;
    for (int g = 0; g < G; g += 16) {
        const __mmask16 m = first(G - g);
        const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, srow + g));
        const __m512 z = d.zero ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                      _mm_maskz_loadu_epi8(m, d.zero + (int64_t)n * G + g)))
                                : _mm512_set1_ps((float)d.fixed_zero);
        const __m512 sz = _mm512_mul_ps(s, z);
        for (int t = 0; t < T; ++t) tot[t] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(m, xsum + t * G + g), tot[t]);
    }
}

template <int T, int BITS>
Q8_TARGET void rows_q8(const ProjDesc& d, int n0, int n1, const QAct* a, const float* xsum, float* y, int64_t ldy) {
    constexpr int C = chunk_codes(BITS), CB = chunk_bytes(BITS), P = chunk_parts(BITS);
    const int64_t chunks = chunks_of(d.in_features, C);
    const int G = d.groups, per_chunk = G == 1 || d.group % C == 0 ? 0 : C / d.group;
    const __m512i idx = per_chunk ? lane_groups(C / 16, d.group) : _mm512_setzero_si512();
    const __mmask64 full = CB == 64 ? ~0ull : (1ull << CB) - 1;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
        const uint16_t* srow = d.scale + (d.scale_rows == 1 ? 0 : (int64_t)n * G);
        __m512 tot[T];
        for (int t = 0; t < T; ++t) tot[t] = _mm512_setzero_ps();
        __m512 svec = _mm512_setzero_ps();
        for (int64_t c = 0, g = 0, next = 0; c < chunks; ++c) {
            const int64_t rem = d.row_bytes - c * CB;  // >= 1: the chunk holds a code below in_features
            __m512i part[P];
            _mm_prefetch((const char*)row + c * CB + kPrefetch, _MM_HINT_T0);
            decode_chunk<BITS>(row + c * CB, rem >= CB ? full : (1ull << rem) - 1, part);
            if (per_chunk) {
                const int64_t g0 = c * per_chunk;
                const __m256i h = _mm256_maskz_loadu_epi16(first((int)(G - g0 < per_chunk ? G - g0 : per_chunk)), srow + g0);
                svec = _mm512_permutexvar_ps(idx, _mm512_cvtph_ps(h));
            } else if (c == next) {  // a group of whole chunks starts (no division in the loop)
                svec = _mm512_set1_ps(_cvtsh_ss(srow[g++]));
                next += G == 1 ? chunks : d.group / C;
            }
            for (int t = 0; t < T; ++t) {
                const int8_t* xq = a[t].xq + c * C;
                __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), part[0], _mm512_loadu_si512(xq));
                for (int p = 1; p < P; ++p) acc = _mm512_dpbusd_epi32(acc, part[p], _mm512_loadu_si512(xq + 64 * p));
                const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(a[t].dvec + c * 16));
                tot[t] = _mm512_fmadd_ps(f, svec, tot[t]);
            }
        }
        zero_points<T>(d, n, srow, xsum, tot);
        for (int t = 0; t < T; ++t) y[t * ldy + n] = _mm512_reduce_add_ps(tot[t]);
    }
}

using RowsFn = void (*)(const ProjDesc&, int, int, const QAct*, const float*, float*, int64_t);

template <int BITS>
constexpr RowsFn kRows[kMaxTokens + 1] = {nullptr,          rows_q8<1, BITS>, rows_q8<2, BITS>, rows_q8<3, BITS>,
                                          rows_q8<4, BITS>, rows_q8<5, BITS>, rows_q8<6, BITS>, rows_q8<7, BITS>,
                                          rows_q8<8, BITS>};

// Position of code k of a chunk in the order its decoder yields codes (part k % P, byte k / P).
inline int chunk_position(int k, int C) {
    const int P = C / 64;
    return (k % P) * 64 + k / P;
}

}  // namespace

int q8_chunk_codes(int bits) { return chunk_codes(bits); }

bool q8_fits(const ProjDesc& d) {
    if (!has_q8() || (d.bits != 2 && d.bits != 3 && d.bits != 4 && d.bits != 8)) return false;
    const int C = chunk_codes(d.bits);
    return d.groups == 1 || (d.group % kBlock == 0 && (d.group % C == 0 || C % d.group == 0));
}

size_t q8_act_floats(int64_t K, int C) { return (size_t)(chunks_of(K, C) * 16 + (K + kBlock - 1) / kBlock); }

Q8_TARGET void q8_quantize(const float* x, int64_t K, int C, int8_t* xq, float* dvec, float* bsum) {
    const int64_t chunks = chunks_of(K, C), blocks = (K + kBlock - 1) / kBlock;
    memset(xq, 0, (size_t)(chunks * C));
    alignas(64) int32_t q[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlock;
        const int n = K - k0 < kBlock ? (int)(K - k0) : kBlock;
        const __m512 v = _mm512_maskz_loadu_ps(first(n), x + k0);
        const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
        const float scale = amax / 127.f;
        const __m512i qi = scale > 0.f ? _mm512_cvtps_epi32(_mm512_div_ps(v, _mm512_set1_ps(scale))) : _mm512_setzero_si512();
        _mm512_store_si512(q, qi);
        for (int i = 0; i < n; ++i) {
            const int64_t k = k0 + i;
            xq[k / C * C + chunk_position((int)(k % C), C)] = (int8_t)q[i];
        }
        bsum[b] = scale * (float)_mm512_reduce_add_epi32(qi);
        for (int64_t k = k0; k < k0 + kBlock; k += C / 16) dvec[k / (C / 16)] = scale;  // the block's lanes
    }
    for (int64_t i = (K + C / 16 - 1) / (C / 16); i < chunks * 16; ++i) dvec[i] = 0.f;  // lanes past the row
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
    const RowsFn fn = d.bits == 2 ? kRows<2>[T] : d.bits == 3 ? kRows<3>[T] : d.bits == 4 ? kRows<4>[T] : kRows<8>[T];
    fn(d, n0, n1, a, xsum, y, ldy);
}

}  // namespace moecpu
