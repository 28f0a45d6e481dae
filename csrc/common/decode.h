// Per-format decoding shared by the CPU and GPU expert kernels (host and device code): the stored row is a
// little-endian bit stream of `bits`-wide codes in 32-bit words (docs/FORMAT.md), so 32 consecutive codes, a
// "unit", are exactly `bits` whole words. The CPU's portable path decodes with these functions, so its tests
// (tests/runtime/test_native.py) exercise the logic the CUDA kernels run.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

constexpr int kUnitCodes = 32;  // codes per unit: `bits` words

// fp16 bits -> float, subnormals included.
MOE_HD float moe_half_to_float(uint16_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal
            int e = -1;
            uint32_t m = mant;
            do {
                ++e;
                m <<= 1;
            } while ((m & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Words [unit * bits, unit * bits + bits) of a row of `row_words` words into w (missing words past the row: 0).
MOE_HD void moe_load_unit(const uint32_t* row, int64_t row_words, int64_t unit, int bits, uint32_t* w) {
    for (int i = 0; i < bits; ++i) {
        const int64_t j = unit * bits + i;
        w[i] = j < row_words ? row[j] : 0u;
    }
}

// Code i (0..31) of a unit held in w[0 .. bits-1].
MOE_HD int moe_unit_code(const uint32_t* w, int i, int bits) {
    const int bit = i * bits, word = bit >> 5, shift = bit & 31;
    uint32_t v = w[word] >> shift;
    if (shift + bits > 32) v |= w[word + 1] << (32 - shift);
    return (int)(v & ((1u << bits) - 1u));
}

// Code k of a row (any k below the row's code count).
MOE_HD int moe_code_at(const uint8_t* row, int64_t k, int bits) {
    const int64_t bit = k * bits, byte = bit >> 3;
    const int shift = (int)(bit & 7);
    uint32_t w = row[byte];
    if (shift + bits > 8) w |= (uint32_t)row[byte + 1] << 8;
    return (int)((w >> shift) & ((1u << bits) - 1u));
}
