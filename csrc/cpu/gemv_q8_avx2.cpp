// AVX2 row kernels with int8 activations (see gemv_q8.cpp for the scheme).
#include <algorithm>
#include <vector>

#include "q8.h"
#include "simd.h"

namespace moecpu {

namespace {

// AVX2 (no AVX-512): the same scheme with 256-bit vectors. A chunk is one 32-byte load (128 2-bit, 64 4-bit or
// 32 8-bit codes) in 8 lanes of the same L consecutive codes; the byte products are summed by vpmaddubsw and
// vpmaddwd (no overflow for codes below 16: 15 * 127 * 2 < 2^15), or by AVX-VNNI's vpdpbusd where the CPU has
// it. 8-bit codes without AVX-VNNI are taken as code - 128 (signed), their magnitude times the activation with
// their sign (|c - 128| * 127 * 2 < 2^15, llama.cpp's AVX2 trick), and the zero point as z - 128. 3-bit rows come
// widened to 4-bit codes (runtime/native.py, `widened`).
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

// acc += byte dot products of w (signed, -128 allowed) and s (signed, |s| <= 127) in fours, without AVX-VNNI.
Q8_AVX2_TARGET inline __m256i dot_signed_bytes(__m256i acc, __m256i w, __m256i s) {
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
}

// 8-bit codes without AVX-VNNI run as signed code - 128 (see above).
template <int BITS, bool VNNI>
constexpr bool kSigned8 = BITS == 8 && !VNNI;

// The int32 lane sums of one chunk's byte products with one token's activations x. Without AVX-VNNI the parts'
// vpmaddubsw sums are added as int16 first (|sum| <= P * 2 * 15 * 127 < 2^15 for 4-bit, P * 2 * 3 * 127 for
// 2-bit), so one vpmaddwd widens them all.
template <int BITS, bool VNNI>
Q8_AVX2_TARGET inline __m256i chunk_isum(const __m256i* part, const int8_t* x) {
    constexpr int P = 8 / BITS;
    if constexpr (kSigned8<BITS, VNNI>) {
        return dot_signed_bytes(_mm256_setzero_si256(), part[0], _mm256_loadu_si256((const __m256i*)x));
    } else if constexpr (VNNI) {
        __m256i acc = _mm256_setzero_si256();
        for (int p = 0; p < P; ++p) acc = dot_bytes<true>(acc, part[p], _mm256_loadu_si256((const __m256i*)(x + 32 * p)));
        return acc;
    } else {
        __m256i s16 = _mm256_maddubs_epi16(part[0], _mm256_loadu_si256((const __m256i*)x));
        for (int p = 1; p < P; ++p)
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(part[p], _mm256_loadu_si256((const __m256i*)(x + 32 * p))));
        return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    }
}

// tot[t] += (the chunk's lane sums with token t's activations) * d * svec: d the activation blocks' scales of
// the lanes, svec the weight groups' scales.
template <int T, int BITS, bool VNNI>
Q8_AVX2_TARGET inline void chunk_dot_avx2(__m256i v, int64_t c, const int8_t* const* xq, const float* const* dvec,
                                          __m256 svec, __m256* tot) {
    constexpr int C = 32 * 8 / BITS, P = 8 / BITS;
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    __m256i part[P];
    for (int p = 0; p < P; ++p) part[p] = BITS == 8 ? v : _mm256_and_si256(_mm256_srli_epi16(v, p * BITS), mask);
    if constexpr (kSigned8<BITS, VNNI>) part[0] = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
    for (int t = 0; t < T; ++t)
        tot[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_isum<BITS, VNNI>(part, xq[t] + c * C)),
                                 _mm256_mul_ps(_mm256_loadu_ps(dvec[t] + c * 8), svec), tot[t]);
}

// The row's fp16 scales as floats (F16C, eight at a time).
Q8_AVX2_TARGET inline void scales_f32(const uint16_t* s, int G, float* out) {
    int g = 0;
    for (; g + 8 <= G; g += 8) _mm256_storeu_ps(out + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g))));
    for (; g < G; ++g) out[g] = _cvtsh_ss(s[g]);
}

template <int T, int BITS, bool VNNI>
Q8_AVX2_TARGET void rows_q8_avx2(const ProjDesc& d, int n0, int n1, const QAct* a,
                                                                  const float* xsum, float* y, int64_t ldy) {
    // codes per 32-byte chunk; U independent sums per token (two for one or two tokens: one chain of FMAs would
    // wait on each one's latency)
    constexpr int C = 32 * 8 / BITS, U = T <= 2 ? 2 : 1;
    const int64_t chunks = chunks_of(d.in_features, C);
    const int G = d.groups, per_chunk = G == 1 || d.group % C == 0 ? 0 : C / d.group;
    alignas(32) int32_t lane_group[8];
    for (int i = 0; i < 8; ++i) lane_group[i] = per_chunk ? i * (C / 8) / d.group : 0;
    const __m256i idx = _mm256_load_si256((const __m256i*)lane_group);
    // whole chunks of groups of a power of two of whole chunks in a plain loop (chunk c in group c >> shift),
    // the rest in the general one
    const int64_t span = per_chunk ? 1 : G == 1 ? chunks : d.group / C;
    const bool pow2 = !per_chunk && (G == 1 || (span & (span - 1)) == 0);
    const int shift = G == 1 ? 62 : __builtin_ctzll((unsigned long long)span);
    const int64_t plain = pow2 ? std::min(chunks, d.row_bytes / 32) : 0;
    thread_local std::vector<float> scale;
    scale.assign((size_t)G + 8, 0.f);
    const float* sf = scale.data();
    const int8_t* xq[T];
    const float* dvec[T];
    for (int t = 0; t < T; ++t) xq[t] = a[t].xq, dvec[t] = a[t].dvec;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = d.packed + (int64_t)n * d.row_bytes;
        if (n == n0 || d.scale_rows != 1) scales_f32(d.scale + (d.scale_rows == 1 ? 0 : (int64_t)n * G), G, scale.data());
        __m256 tot[U][T];
        for (int u = 0; u < U; ++u)
            for (int t = 0; t < T; ++t) tot[u][t] = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + U <= plain; c += U)
            for (int u = 0; u < U; ++u) {
                _mm_prefetch((const char*)row + (c + u) * 32 + kPrefetch, _MM_HINT_T0);
                const __m256i v = _mm256_loadu_si256((const __m256i*)(row + (c + u) * 32));
                chunk_dot_avx2<T, BITS, VNNI>(v, c + u, xq, dvec, _mm256_broadcast_ss(sf + ((c + u) >> shift)), tot[u]);
            }
        for (int u = 1; u < U; ++u)
            for (int t = 0; t < T; ++t) tot[0][t] = _mm256_add_ps(tot[0][t], tot[u][t]);
        for (; c < chunks; ++c) {
            __m256i v;
            const int64_t rem = d.row_bytes - c * 32;
            if (rem >= 32) {
                v = _mm256_loadu_si256((const __m256i*)(row + c * 32));
            } else {  // the row's last bytes: never read past it
                alignas(32) uint8_t tail[32] = {0};
                memcpy(tail, row + c * 32, (size_t)rem);
                v = _mm256_load_si256((const __m256i*)tail);
            }
            __m256 svec;
            if (per_chunk) {
                svec = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf + c * per_chunk), idx);  // 8 floats past G: zeros
            } else {
                svec = _mm256_set1_ps(sf[c / span]);
            }
            chunk_dot_avx2<T, BITS, VNNI>(v, c, xq, dvec, svec, tot[0]);
        }
        // zero points: minus sum_g scale_g * zero_g * xsum[t, g], eight groups a vector
        const float off = kSigned8<BITS, VNNI> ? 128.f : 0.f;
        const uint8_t* zrow = d.zero ? d.zero + (int64_t)n * G : nullptr;
        int g = 0;
        for (; g + 8 <= G; g += 8) {
            const __m256 z = zrow ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zrow + g))))
                                  : _mm256_set1_ps((float)d.fixed_zero);
            const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sf + g), _mm256_sub_ps(z, _mm256_set1_ps(off)));
            for (int t = 0; t < T; ++t) tot[0][t] = _mm256_fnmadd_ps(sz, _mm256_loadu_ps(xsum + t * G + g), tot[0][t]);
        }
        float out[T];
        for (int t = 0; t < T; ++t) out[t] = hsum8(tot[0][t]);
        for (; g < G; ++g) {
            const float sz = sf[g] * (zero_of(d, n, g) - off);
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

const RowsFn* q8_rows_avx2(int bits, bool vnni) {
    switch (bits) {
        case 2: return vnni ? kRowsAvx2<2, true> : kRowsAvx2<2, false>;
        case 4: return vnni ? kRowsAvx2<4, true> : kRowsAvx2<4, false>;
        case 8: return vnni ? kRowsAvx2<8, true> : kRowsAvx2<8, false>;
        default: return nullptr;  // 3-bit codes stay on the float32 kernels
    }
}

}  // namespace moecpu
