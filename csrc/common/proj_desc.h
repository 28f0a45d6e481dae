// The projection descriptor: how the CPU, CUDA and Triton backends see one packed weight matrix (docs/FORMAT.md).
// Declared once, here; `moecompress/runtime/native.py` mirrors it with ctypes and checks every field's offset
// against `moe_proj_desc_layout` (cpu/moe_forward.cpp) when the library loads, and the packed-format classes
// (`moecompress/quant/formats.py`) fill it: `bits` are the widths of the codes the kernels decode (a format whose
// stored codes are not plain bit streams, base-3 ternary, hands the kernels a 2-bit repacking), `fixed_zero` the
// zero point of formats that store none.
//
//   y[t, n] = sum_g scale[n, g] * (sum_{k in g} x[t, k] q[n, k] - zero[n, g] * sum_{k in g} x[t, k])
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" {

struct ProjDesc {
    const uint8_t* packed;       // row-major rows of `row_bytes` bytes (little-endian streams of `bits`-wide codes)
    const uint16_t* scale;       // fp16 [scale_rows, groups]
    const uint8_t* zero;         // uint8 [out, groups], or null: fixed zero `fixed_zero`
    int64_t row_bytes;
    int32_t out_features, in_features;
    int32_t bits, group;         // group: columns per scale (in_features for one group per row / tensor)
    int32_t groups, scale_rows;  // scale_rows: out_features, or 1 (one scale per tensor)
    int32_t fixed_zero;
    int32_t pad_;
    const float* bias;           // float32 [out_features] added to the outputs, or null (the CUDA paths: null)
};

}  // extern "C"

// Field order of `moe_proj_desc_layout`'s answer: the size, then each field's offset in declaration order.
#define MOE_PROJ_DESC_FIELDS(X) \
    X(packed) X(scale) X(zero) X(row_bytes) X(out_features) X(in_features) X(bits) X(group) X(groups) \
    X(scale_rows) X(fixed_zero) X(pad_) X(bias)
constexpr int kProjDescFields = 13;
static_assert(sizeof(ProjDesc) == 72, "ProjDesc: 72 bytes on every 64-bit target (native.py checks each offset)");
