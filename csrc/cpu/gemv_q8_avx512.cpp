// AVX-512 VNNI + VBMI row kernels with int8 activations (see gemv_q8.cpp for the scheme).
#include <algorithm>

#include "q8.h"
#include "simd.h"

namespace moecpu {

namespace {

#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))

constexpr int chunk_bytes(int bits) { return chunk_codes(bits) * bits / 8; }
constexpr int chunk_parts(int bits) { return bits == 2 ? 4 : bits == 4 ? 2 : 1; }

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

template <int BITS>
constexpr RowsFn kRows[kMaxTokens + 1] = {nullptr,          rows_q8<1, BITS>, rows_q8<2, BITS>, rows_q8<3, BITS>,
                                          rows_q8<4, BITS>, rows_q8<5, BITS>, rows_q8<6, BITS>, rows_q8<7, BITS>,
                                          rows_q8<8, BITS>};

}  // namespace

const RowsFn* q8_rows_avx512(int bits) {
    switch (bits) {
        case 2: return kRows<2>;
        case 3: return kRows<3>;
        case 4: return kRows<4>;
        case 8: return kRows<8>;
        default: return nullptr;  // no chunk decoder for this width
    }
}

}  // namespace moecpu
