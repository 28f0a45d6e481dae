// What the float32-activation kernels share across their ISA files (gemv_f32.cpp: dispatch and the portable
// path; gemv_f32_avx2.cpp, gemv_f32_avx512.cpp: the row kernels).
#pragma once

#include <immintrin.h>

#include "packed.h"

namespace moecpu {

// Row n of y for T tokens (one function per T in 1..kMaxTokens, index 0 unused): x as given, xp x permuted for the
// block decoders (`permute_x`; null: no block decoding), xsum the groups' sums of x.
using RowFn = void (*)(const ProjDesc&, int, const float*, const float*, const float*, float*, int);

const RowFn* f32_rows_avx2();
const RowFn* f32_rows_avx512();
// Many tokens (prefill), AVX-512: each row dequantized once, then dotted with every token.
void f32_gemm_avx512(const ProjDesc& d, const float* x, int64_t T, float* y);

// The float32 kernels' traits table, one row per code width: codes per vector lane of the block decoders (a block is
// lanes x this many codes; 0: no block decoder, the generic 8-code decoding runs), for AVX2 and AVX-512.
struct F32Traits {
    int avx2, avx512;
};
constexpr F32Traits kF32Traits[9] = {{}, {}, {4, 4}, {}, {2, 2}, {}, {}, {}, {0, 1}};

// Codes per block of the fast path for this projection with `lanes` floats per vector (8: AVX2, 16: AVX-512),
// or 0 (no block decoder for these bits, or groups that split a block).
int block_codes(const ProjDesc& d, int lanes);

// xp[t, k]: x reordered within each whole block as the block decoders read it (tail columns unchanged).
void permute_x(const float* x, int T, int64_t K, int block, int lanes, float* xp);

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

// Eight codes from code k of a row as floats (any width; 3-bit codes at multiples of 8 without a shift).
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

}  // namespace moecpu
