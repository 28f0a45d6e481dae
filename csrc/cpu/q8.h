// What the int8-activation kernels share across their ISA files (gemv_q8.cpp: activations, layouts, dispatch;
// gemv_q8_avx512.cpp, gemv_q8_avx2.cpp: the row kernels).
#pragma once

#include "packed.h"

namespace moecpu {

constexpr int kQ8Block = 16;  // activations per int8 scale
// Bytes ahead of the chunk being decoded that are prefetched: the hardware prefetchers stop at 4 KiB pages,
// and one expert's rows are not in huge pages.
#ifndef MOE_PREFETCH
#define MOE_PREFETCH 4096
#endif
constexpr int kPrefetch = MOE_PREFETCH;

inline int64_t chunks_of(int64_t K, int C) { return (K + C - 1) / C; }

// Codes per 512-bit chunk of the AVX-512 kernels (2-bit: 256 from 64 bytes, 4-bit: 128, 3- and 8-bit: 64).
constexpr int chunk_codes(int bits) { return bits == 2 ? 256 : bits == 4 ? 128 : 64; }

// Rows [n0, n1) of y for T tokens; one function per T in 1..kMaxTokens (index 0 unused).
using RowsFn = void (*)(const ProjDesc&, int, int, const QAct*, const float*, float*, int64_t);

// The row kernels of each ISA for `bits`-wide codes, or null where that ISA has none (a column of the traits
// table in gemv_q8.cpp each).
const RowsFn* q8_rows_avx512(int bits);            // AVX-512 VNNI + VBMI: 64-byte chunks
const RowsFn* q8_rows_avx2(int bits, bool vnni);   // AVX2 (with AVX-VNNI's vpdpbusd where `vnni`): 32-byte chunks

}  // namespace moecpu
