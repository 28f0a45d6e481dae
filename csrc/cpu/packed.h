// Shared declarations of the CPU expert kernels: scalar code access, run-time ISA checks, and the entry points
// each source file gives the others; the projection descriptor is common/proj_desc.h.
//
// A packed row is a little-endian bit stream of `bits`-wide codes (2, 3, 4 or 8 bits; ternary formats use
// 2-bit codes, base-3 rows are repacked to 2-bit codes once at load by the caller), with fp16 scales and
// uint8 zero points per (row, group):
//
//   y[t, n] = sum_g scale[n, g] * (sum_{k in g} x[t, k] q[n, k] - zero[n, g] * sum_{k in g} x[t, k])
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../common/decode.h"
#include "../common/proj_desc.h"

namespace moecpu {

constexpr int kMaxTokens = 8;  // tokens decoded per pass over a weight row

inline float half_to_float(uint16_t h) { return moe_half_to_float(h); }

inline int code_at(const uint8_t* row, int64_t k, int bits) { return moe_code_at(row, k, bits); }

inline float zero_of(const ProjDesc& d, int n, int g) {
    return d.zero ? (float)d.zero[(int64_t)n * d.groups + g] : (float)d.fixed_zero;
}

// MOECOMPRESS_NO_AVX512=1 stops at AVX2; MOECOMPRESS_NO_AVX2=1 takes the portable path (the decoding the CUDA
// kernels share, common/decode.h).
inline bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return yes && getenv("MOECOMPRESS_NO_AVX2") == nullptr;
}

inline bool has_avx512() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl");
    return yes && has_avx2() && getenv("MOECOMPRESS_NO_AVX512") == nullptr;
}

// AVX-512 VNNI + VBMI: the int8-activation kernels (gemv_q8.cpp).
inline bool has_q8() {
    static const bool yes = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
    return yes && has_avx512();
}

// AVX-VNNI (256-bit vpdpbusd): 8-bit codes in the AVX2 int8 kernels (without it, products of codes above 127
// would saturate vpmaddubsw's 16-bit sums).
inline bool has_avxvnni() {  // MOECOMPRESS_NO_AVXVNNI=1: vpmaddubsw instead (tests)
    static const bool yes = __builtin_cpu_supports("avxvnni");
    return yes && has_avx2() && getenv("MOECOMPRESS_NO_AVXVNNI") == nullptr;
}

// gemv_f32.cpp: y[T, out] = x[T, in] W^T with float32 activations, any T.
void project_f32(const ProjDesc& d, const float* x, int64_t T, float* y);

// gemv_q8.cpp: the same with activations quantized to int8 per block of 16 (see there).
struct Q8Layout {  // how a projection's int8 activations are laid out on this CPU
    int chunk;     // codes decoded from one vector load of a row
    int part;      // bytes of one decoded part (64: AVX-512, 32: AVX2); a chunk has chunk / part parts
};
constexpr int kQ8Layouts = 6;  // AVX-512: chunks of 64, 128, 256 codes; AVX2: 32, 64, 128
bool q8_fits(const ProjDesc& d);
Q8Layout q8_layout(int bits);
int q8_layout_id(Q8Layout layout);  // 0 .. kQ8Layouts - 1

struct QAct {            // one token's activations, quantized for weights of one layout
    const int8_t* xq;    // [chunks * chunk]: whole chunks, codes in the order the chunk decoder yields them
    const float* dvec;   // [chunks * lanes]: the scale of the block each 32-bit lane's codes lie in
    const float* bsum;   // [ceil(K / 16)]: scale * sum of the block's int8 values
};

size_t q8_act_floats(int64_t K, Q8Layout layout);  // floats of dvec + bsum for one token
size_t q8_dvec_floats(int64_t K, Q8Layout layout);
void q8_quantize(const float* x, int64_t K, Q8Layout layout, int8_t* xq, float* dvec, float* bsum);
// xsum[t, g] = sum of the group's quantized activations (for the zero points), per token of `a`.
void q8_group_sums(const ProjDesc& d, const QAct* a, int T, float* xsum);
// Rows [n0, n1) of y[t * ldy + n] for T <= kMaxTokens tokens.
void q8_rows(const ProjDesc& d, int n0, int n1, const QAct* a, const float* xsum, int T, float* y, int64_t ldy);

}  // namespace moecpu
