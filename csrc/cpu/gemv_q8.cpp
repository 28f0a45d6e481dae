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
#include <math.h>

#include <algorithm>
#include <vector>

#include "packed.h"
#include "simd.h"

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
    // a masked byte load costs more than a plain one: plain wherever 64 bytes of the row remain
    const __m512i v = m == ~0ull ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
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

// The `count` fp16 scales of a chunk's groups (a chunk holds 2, 4, 8 or 16): plain loads where the count is whole,
// a masked one (slower) at a row's end.
Q8_TARGET inline __m256i chunk_scales(const uint16_t* p, int count, int per_chunk) {
    if (count == per_chunk) {
        if (count == 16) return _mm256_loadu_si256((const __m256i*)p);
        if (count == 8) return _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)p));
        if (count == 4) return _mm256_zextsi128_si256(_mm_loadl_epi64((const __m128i*)p));
        if (count == 2) return _mm256_zextsi128_si256(_mm_loadu_si32(p));
    }
    return _mm256_maskz_loadu_epi16(first(count), p);
}

// tot[t] -= sum_g scale_g * zero_g * xsum[t, g], 16 groups at a time.
template <int T>
Q8_TARGET inline void zero_points(const ProjDesc& d, int n, const uint16_t* srow, const float* xsum, __m512* tot) {
    const int G = d.groups;
    for (int g = 0; g < G; g += 16) {
        const bool whole = G - g >= 16;  // plain loads (cheaper than masked ones) for whole blocks of 16 groups
        const __mmask16 m = first(G - g);
        const uint8_t* zrow = d.zero ? d.zero + (int64_t)n * G + g : nullptr;
        const __m256i h = whole ? _mm256_loadu_si256((const __m256i*)(srow + g)) : _mm256_maskz_loadu_epi16(m, srow + g);
        const __m512 z = zrow ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(whole ? _mm_loadu_si128((const __m128i*)zrow)
                                                                             : _mm_maskz_loadu_epi8(m, zrow)))
                              : _mm512_set1_ps((float)d.fixed_zero);
        const __m512 sz = _mm512_mul_ps(_mm512_cvtph_ps(h), z);
        for (int t = 0; t < T; ++t) {
            const float* xs = xsum + t * G + g;
            tot[t] = _mm512_fnmadd_ps(sz, whole ? _mm512_loadu_ps(xs) : _mm512_maskz_loadu_ps(m, xs), tot[t]);
        }
    }
}

// tot[t] += (chunk c's byte products with token t's activations) * d * svec, for the decoded `part`s of chunk c.
template <int T, int P, int C>
Q8_TARGET inline void chunk_dot(const __m512i* part, int64_t c, const int8_t* const* xq, const float* const* dvec,
                                __m512 svec, __m512* tot) {
    for (int t = 0; t < T; ++t) {
        const int8_t* x = xq[t] + c * C;
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), part[0], _mm512_loadu_si512(x));
        for (int p = 1; p < P; ++p) acc = _mm512_dpbusd_epi32(acc, part[p], _mm512_loadu_si512(x + 64 * p));
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(dvec[t] + c * 16));
        tot[t] = _mm512_fmadd_ps(f, svec, tot[t]);
    }
}

template <int T, int BITS>
Q8_TARGET void rows_q8(const ProjDesc& d, int n0, int n1, const QAct* a, const float* xsum, float* y, int64_t ldy) {
    constexpr int C = chunk_codes(BITS), CB = chunk_bytes(BITS), P = chunk_parts(BITS);
    const int64_t chunks = chunks_of(d.in_features, C);
    const int G = d.groups, per_chunk = G == 1 || d.group % C == 0 ? 0 : C / d.group;
    const __m512i idx = per_chunk ? lane_groups(C / 16, d.group) : _mm512_setzero_si512();
    const __mmask64 full = CB == 64 ? ~0ull : (1ull << CB) - 1;
    // Groups of whole chunks (per_chunk 0): `span` chunks per scale. The chunks whose 64-byte load stays inside the
    // row (`plain`) run a loop without masks or group bookkeeping; the row's last ones take the general loop.
    const int64_t span = per_chunk ? 1 : G == 1 ? chunks : d.group / C;  // 1: unused (never 0: it divides)
    const int64_t plain = per_chunk || d.row_bytes < 64 ? 0 : std::min(chunks, (d.row_bytes - 64) / CB + 1);
    const int8_t* xq[T];
    const float* dvec[T];
    for (int t = 0; t < T; ++t) xq[t] = a[t].xq, dvec[t] = a[t].dvec;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
        const uint16_t* srow = d.scale + (d.scale_rows == 1 ? 0 : (int64_t)n * G);
        __m512 tot[T];
        for (int t = 0; t < T; ++t) tot[t] = _mm512_setzero_ps();
        __m512 svec = _mm512_setzero_ps();
        int64_t c = 0;
        for (int64_t g = 0; c < plain; ++g) {
            svec = _mm512_set1_ps(_cvtsh_ss(srow[g]));
            for (const int64_t end = std::min(c + span, plain); c < end; ++c) {
                __m512i part[P];
                _mm_prefetch((const char*)row + c * CB + kPrefetch, _MM_HINT_T0);
                decode_chunk<BITS>(row + c * CB, ~0ull, part);
                chunk_dot<T, P, C>(part, c, xq, dvec, svec, tot);
            }
        }
        for (int64_t g = c / span + (c % span != 0), next = g * span; c < chunks; ++c) {
            const int64_t rem = d.row_bytes - c * CB;  // >= 1: the chunk holds a code below in_features
            __m512i part[P];
            decode_chunk<BITS>(row + c * CB, rem >= 64 ? ~0ull : rem >= CB ? full : (1ull << rem) - 1, part);
            if (per_chunk) {
                const int64_t g0 = c * per_chunk;
                const __m256i h = chunk_scales(srow + g0, (int)(G - g0 < per_chunk ? G - g0 : per_chunk), per_chunk);
                svec = _mm512_permutexvar_ps(idx, _mm512_cvtph_ps(h));
            } else if (c == next) {  // a group of whole chunks starts (no division in the loop)
                svec = _mm512_set1_ps(_cvtsh_ss(srow[g++]));
                next += span;
            }
            chunk_dot<T, P, C>(part, c, xq, dvec, svec, tot);
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

// AVX2 (no AVX-512): the same scheme with 256-bit vectors. A chunk is one 32-byte load (128 2-bit, 64 4-bit or
// 32 8-bit codes) in 8 lanes of the same L consecutive codes; the byte products are summed by vpmaddubsw and
// vpmaddwd (no overflow for codes below 16: 15 * 127 * 2 < 2^15), or by AVX-VNNI's vpdpbusd where the CPU has
// it (then 8-bit codes too). 3-bit codes stay on the float32 kernels here.
#define Q8_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

// acc += byte dot products of u (unsigned) and s (signed) in fours. AVX-VNNI's vpdpbusd is written as inline
// assembly, so that this code is compiled for plain AVX2 and runs on CPUs without AVX-VNNI (the VNNI branch is
// taken only where the CPU has it).
template <bool VNNI>
Q8_AVX2_TARGET inline __m256i dot_bytes(__m256i acc, __m256i u, __m256i s) {
    if (VNNI) {
        asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
        return acc;
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// `count` (<= 8) fp16 values from p as floats, zeros after them (never reading past p + count).
Q8_AVX2_TARGET inline __m256 half8(const uint16_t* p, int count) {
    alignas(16) uint16_t h[8] = {0};
    memcpy(h, p, sizeof(uint16_t) * (size_t)count);
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)h));
}

// tot[t] += (the chunk's byte products with token t's activations) * d * svec (AVX2; see chunk_dot).
template <int T, int BITS, bool VNNI>
Q8_AVX2_TARGET inline void chunk_dot_avx2(__m256i v, int64_t c, const int8_t* const* xq, const float* const* dvec,
                                          __m256 svec, __m256* tot) {
    constexpr int C = 32 * 8 / BITS, P = 8 / BITS;
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    __m256i part[P];
    for (int p = 0; p < P; ++p) part[p] = BITS == 8 ? v : _mm256_and_si256(_mm256_srli_epi16(v, p * BITS), mask);
    for (int t = 0; t < T; ++t) {
        const int8_t* x = xq[t] + c * C;
        __m256i acc = _mm256_setzero_si256();
        for (int p = 0; p < P; ++p)
            acc = dot_bytes<VNNI>(acc, part[p], _mm256_loadu_si256((const __m256i*)(x + 32 * p)));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(dvec[t] + c * 8));
        tot[t] = _mm256_fmadd_ps(f, svec, tot[t]);
    }
}

template <int T, int BITS, bool VNNI>
Q8_AVX2_TARGET void rows_q8_avx2(const ProjDesc& d, int n0, int n1, const QAct* a,
                                                                  const float* xsum, float* y, int64_t ldy) {
    constexpr int C = 32 * 8 / BITS;  // codes per 32-byte chunk
    const int64_t chunks = chunks_of(d.in_features, C);
    const int G = d.groups, per_chunk = G == 1 || d.group % C == 0 ? 0 : C / d.group;
    alignas(32) int32_t lane_group[8];
    for (int i = 0; i < 8; ++i) lane_group[i] = per_chunk ? i * (C / 8) / d.group : 0;
    const __m256i idx = _mm256_load_si256((const __m256i*)lane_group);
    // as rows_q8: whole chunks of groups of whole chunks in a plain loop, the rest in the general one
    const int64_t span = per_chunk ? 1 : G == 1 ? chunks : d.group / C;  // 1: unused (never 0: it divides)
    const int64_t plain = per_chunk ? 0 : std::min(chunks, d.row_bytes / 32);
    const int8_t* xq[T];
    const float* dvec[T];
    for (int t = 0; t < T; ++t) xq[t] = a[t].xq, dvec[t] = a[t].dvec;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
        const uint16_t* srow = d.scale + (d.scale_rows == 1 ? 0 : (int64_t)n * G);
        __m256 tot[T];
        for (int t = 0; t < T; ++t) tot[t] = _mm256_setzero_ps();
        __m256 svec = _mm256_setzero_ps();
        int64_t c = 0;
        for (int64_t g = 0; c < plain; ++g) {
            svec = _mm256_set1_ps(_cvtsh_ss(srow[g]));
            for (const int64_t end = std::min(c + span, plain); c < end; ++c) {
                _mm_prefetch((const char*)row + c * 32 + kPrefetch, _MM_HINT_T0);
                const __m256i v = _mm256_loadu_si256((const __m256i*)(row + c * 32));
                chunk_dot_avx2<T, BITS, VNNI>(v, c, xq, dvec, svec, tot);
            }
        }
        for (int64_t g = c / span + (c % span != 0), next = g * span; c < chunks; ++c) {
            __m256i v;
            const int64_t rem = d.row_bytes - c * 32;
            if (rem >= 32) {
                v = _mm256_loadu_si256((const __m256i*)(row + c * 32));
            } else {  // the row's last bytes: never read past it
                alignas(32) uint8_t tail[32] = {0};
                memcpy(tail, row + c * 32, (size_t)rem);
                v = _mm256_load_si256((const __m256i*)tail);
            }
            if (per_chunk) {
                const int64_t g0 = c * per_chunk;
                svec = _mm256_permutevar8x32_ps(half8(srow + g0, (int)(G - g0 < per_chunk ? G - g0 : per_chunk)), idx);
            } else if (c == next) {
                svec = _mm256_set1_ps(_cvtsh_ss(srow[g++]));
                next += span;
            }
            chunk_dot_avx2<T, BITS, VNNI>(v, c, xq, dvec, svec, tot);
        }
        float out[T];
        for (int t = 0; t < T; ++t) out[t] = hsum8(tot[t]);
        for (int g = 0; g < G; ++g) {  // zero points
            const float sz = half_to_float(srow[g]) * zero_of(d, n, g);
            for (int t = 0; t < T; ++t) out[t] -= sz * xsum[t * G + g];
        }
        for (int t = 0; t < T; ++t) y[t * ldy + n] = out[t];
    }
}

template <int BITS, bool VNNI>
constexpr RowsFn kRowsAvx2[kMaxTokens + 1] = {
    nullptr,
    rows_q8_avx2<1, BITS, VNNI>, rows_q8_avx2<2, BITS, VNNI>, rows_q8_avx2<3, BITS, VNNI>, rows_q8_avx2<4, BITS, VNNI>,
    rows_q8_avx2<5, BITS, VNNI>, rows_q8_avx2<6, BITS, VNNI>, rows_q8_avx2<7, BITS, VNNI>, rows_q8_avx2<8, BITS, VNNI>};

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
    const bool isa = has_q8() ? (d.bits == 2 || d.bits == 3 || d.bits == 4 || d.bits == 8)
                              : has_avx2() && (d.bits == 2 || d.bits == 4 || (d.bits == 8 && has_avxvnni()));
    if (!isa) return false;
    const int C = q8_layout(d.bits).chunk;
    return d.groups == 1 || (d.group % kBlock == 0 && (d.group % C == 0 || C % d.group == 0));
}

size_t q8_dvec_floats(int64_t K, Q8Layout layout) { return (size_t)(chunks_of(K, layout.chunk) * (layout.part / 4)); }

size_t q8_act_floats(int64_t K, Q8Layout layout) { return q8_dvec_floats(K, layout) + (size_t)((K + kBlock - 1) / kBlock); }

// Portable (every ISA takes the same activations): scale = max|x| / 127, round half to even, per block of 16;
// the values go where the layout's chunk decoder yields their codes (part k % P, byte k / P of the chunk).
void q8_quantize(const float* x, int64_t K, Q8Layout layout, int8_t* xq, float* dvec, float* bsum) {
    const int C = layout.chunk, P = C / layout.part > 0 ? C / layout.part : 1, L = C / (layout.part / 4);
    const int64_t chunks = chunks_of(K, C), blocks = (K + kBlock - 1) / kBlock;
    memset(xq, 0, (size_t)(chunks * C));
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlock, k1 = K - k0 < kBlock ? K : k0 + kBlock;
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = fmaxf(amax, fabsf(x[k]));
        const float scale = amax / 127.f;
        int32_t sum = 0;
        for (int64_t k = k0; k < k1; ++k) {
            const int q = scale > 0.f ? (int)nearbyintf(x[k] / scale) : 0;
            const int j = (int)(k % C);
            xq[k / C * C + (j % P) * layout.part + j / P] = (int8_t)q;
            sum += q;
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
    RowsFn fn;
    if (has_q8())
        fn = d.bits == 2 ? kRows<2>[T] : d.bits == 3 ? kRows<3>[T] : d.bits == 4 ? kRows<4>[T] : kRows<8>[T];
    else if (has_avxvnni())
        fn = d.bits == 2 ? kRowsAvx2<2, true>[T] : d.bits == 4 ? kRowsAvx2<4, true>[T] : kRowsAvx2<8, true>[T];
    else
        fn = d.bits == 2 ? kRowsAvx2<2, false>[T] : kRowsAvx2<4, false>[T];
    fn(d, n0, n1, a, xsum, y, ldy);
}

}  // namespace moecpu
