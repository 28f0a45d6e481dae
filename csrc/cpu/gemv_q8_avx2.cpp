// AVX2 row kernels with int8 activations (see gemv_q8.cpp for the scheme).
#include <algorithm>

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
    if constexpr (kSigned8<BITS, VNNI>) part[0] = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
    for (int t = 0; t < T; ++t) {
        const int8_t* x = xq[t] + c * C;
        __m256i acc = _mm256_setzero_si256();
        for (int p = 0; p < P; ++p) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + 32 * p));
            acc = kSigned8<BITS, VNNI> ? dot_signed_bytes(acc, part[p], xv) : dot_bytes<VNNI>(acc, part[p], xv);
        }
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
            const float sz = half_to_float(srow[g]) * (zero_of(d, n, g) - (kSigned8<BITS, VNNI> ? 128.f : 0.f));
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
