// Grouped MoE decode kernels for packed experts on CUDA (batch 1-8 tokens): plain CUDA C++, no torch headers,
// extern "C" launchers taking raw device pointers, sizes and a stream (called through ctypes by
// moecompress/runtime/cuda_kernels.py with torch.cuda.current_stream()).
//
// One thread block per (token, top-k slot) pair and tile of output rows; one warp per row. The weights are read
// as stored (rows of 32-bit words, docs/FORMAT.md; base-3 ternary is repacked to 2-bit codes at load): lane l
// takes units l, l + 32, ... of a row, a unit being the `bits` words that hold 32 codes, so a warp reads
// 32 * 4 * bits contiguous bytes per step (coalesced; 128-bit loads per lane at 4 and 8 bits). Each expert has its own
// format (a per-projection descriptor table, `ProjDesc`), so LP-mixed layers run in the same launch; the
// decoding is common/decode.h, which the CPU kernels' portable path shares and tests.
//
//   gate_up: h[p, n] = silu(gate_e[n] . x_t) * (up_e[n] . x_t)            p = (t, k), e = ids[p]
//   down:    out[t, n] += w[p] * (down_e[n] . h[p])                        (routing weight fused, atomicAdd)
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/decode.h"
#include "../common/proj_desc.h"

namespace {

constexpr int kWarps = 8;  // rows per block

// x staged in shared memory unit by unit with one float of padding per unit (33 floats a unit), so that the 32
// lanes of a warp, each on its own unit, read 32 different banks.
constexpr int kStride = kUnitCodes + 1;

// Unit u of a row into w: one 128-bit load at 4 bits (two at 8, one 64-bit at 2) where the row is 16-byte aligned
// (each expert's tensor is its own allocation, so rows whose size is a multiple of 16 bytes are) and the unit lies
// inside it; word by word otherwise.
template <int BITS>
__device__ __forceinline__ void load_unit(const uint32_t* row, int64_t row_words, int64_t u, bool aligned, uint32_t* w) {
    if (aligned && (u + 1) * BITS <= row_words && (BITS == 2 || BITS == 4 || BITS == 8)) {
        if (BITS == 2) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(row) + u);
            w[0] = v.x, w[1] = v.y;
        } else {
            for (int q = 0; q < BITS / 4; ++q) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + u * (BITS / 4) + q);
                w[4 * q] = v.x, w[4 * q + 1] = v.y, w[4 * q + 2] = v.z, w[4 * q + 3] = v.w;
            }
        }
        return;
    }
    moe_load_unit(row, row_words, u, BITS, w);
}

// Dot of row n of `d` (BITS-bit codes) with the staged x, reduced over the warp.
template <int BITS>
__device__ float row_dot_bits(const ProjDesc& d, int n, const float* x) {
    const int lane = threadIdx.x & 31;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(d.packed + (int64_t)n * d.row_bytes);
    const int64_t row_words = d.row_bytes / 4, units = (d.in_features + kUnitCodes - 1) / kUnitCodes;
    const int srow = d.scale_rows == 1 ? 0 : n;
    const bool unit_groups = d.group % kUnitCodes == 0;  // a unit lies in one group
    const bool aligned = (reinterpret_cast<uintptr_t>(row) & 15) == 0;
    float acc = 0.f;
    uint32_t w[BITS];
    for (int64_t u = lane; u < units; u += 32) {
        load_unit<BITS>(row, row_words, u, aligned, w);
        const float* xu = x + u * kStride;
        if (unit_groups) {
            float dot = 0.f, xs = 0.f;
#pragma unroll
            for (int i = 0; i < kUnitCodes; ++i) dot += xu[i] * (float)moe_unit_code(w, i, BITS), xs += xu[i];
            const int g = (int)(u * kUnitCodes / d.group);
            const float s = __half2float(__ushort_as_half(d.scale[(int64_t)srow * d.groups + g]));
            const float z = d.zero ? (float)d.zero[(int64_t)n * d.groups + g] : (float)d.fixed_zero;
            acc += s * (dot - z * xs);
        } else {
            for (int i = 0; i < kUnitCodes; ++i) {
                const int64_t k = u * kUnitCodes + i;
                const int g = (int)((k < d.in_features ? k : d.in_features - 1) / d.group);
                const float s = __half2float(__ushort_as_half(d.scale[(int64_t)srow * d.groups + g]));
                const float z = d.zero ? (float)d.zero[(int64_t)n * d.groups + g] : (float)d.fixed_zero;
                acc += xu[i] * s * ((float)moe_unit_code(w, i, BITS) - z);
            }
        }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    return acc;
}

// The format switch is uniform over the warp (one row, one projection).
__device__ float row_dot(const ProjDesc& d, int n, const float* x) {
    switch (d.bits) {
        case 2: return row_dot_bits<2>(d, n, x);
        case 3: return row_dot_bits<3>(d, n, x);
        case 4: return row_dot_bits<4>(d, n, x);
        default: return row_dot_bits<8>(d, n, x);
    }
}

// x (`count` floats) into shared memory as units of kStride floats, zeros up to whole units.
__device__ void stage(float* sx, const float* x, int count) {
    const int padded = (count + kUnitCodes - 1) / kUnitCodes * kUnitCodes;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) sx[i / kUnitCodes * kStride + i % kUnitCodes] = i < count ? x[i] : 0.f;
    __syncthreads();
}

__global__ void gate_up_kernel(const ProjDesc* projs, int num_experts, const float* x, const int64_t* ids, int top_k,
                               int hidden, int inter, float* h) {
    extern __shared__ float sx[];
    const int p = blockIdx.y;
    const int64_t e = ids[p];
    const int n = blockIdx.x * kWarps + threadIdx.x / 32;
    if (e < 0 || e >= num_experts) {  // a skipped slot: nothing to add later
        if (n < inter && (threadIdx.x & 31) == 0) h[(int64_t)p * inter + n] = 0.f;
        return;
    }
    stage(sx, x + (int64_t)(p / top_k) * hidden, hidden);
    if (n >= inter) return;
    const float g = row_dot(projs[3 * e], n, sx), u = row_dot(projs[3 * e + 1], n, sx);
    if ((threadIdx.x & 31) == 0) h[(int64_t)p * inter + n] = g / (1.f + __expf(-g)) * u;
}

__global__ void down_kernel(const ProjDesc* projs, int num_experts, const float* h, const int64_t* ids,
                            const float* weights, int top_k, int hidden, int inter, int stride, float* out) {
    extern __shared__ float sx[];
    const int p = blockIdx.y;
    const int64_t e = ids[p];
    if (e < 0 || e >= num_experts) return;
    stage(sx, h + (int64_t)p * inter, inter);
    const int n = blockIdx.x * kWarps + threadIdx.x / 32;
    if (n >= hidden) return;
    const float y = row_dot(projs[stride * e + (stride == 3 ? 2 : 0)], n, sx);
    if ((threadIdx.x & 31) == 0) atomicAdd(out + (int64_t)(p / top_k) * hidden + n, weights[p] * y);
}

size_t staged_bytes(int count) { return (size_t)(count + kUnitCodes - 1) / kUnitCodes * kStride * sizeof(float); }

// Kernels staging more than 48 KiB of shared memory must say so first.
void allow_shared(const void* kernel, size_t bytes) {
    if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

}  // namespace

extern "C" {

// One MoE layer for T tokens (T * top_k pairs): out[T, hidden] (float32, overwritten) from x[T, hidden] (float32),
// ids/weights[T, top_k], the 3 * num_experts descriptors `projs` (gate, up, down per expert; device memory)
// and a scratch h[T * top_k, inter] (float32). Returns the CUDA error code of the launches (0: none).
int moe_cuda_experts_forward(const ProjDesc* projs, int num_experts, const float* x, const int64_t* ids,
                             const float* weights, int tokens, int top_k, int hidden, int inter, float* h, float* out,
                             cudaStream_t stream) {
    const int pairs = tokens * top_k;
    if (pairs == 0) return 0;
    cudaMemsetAsync(out, 0, sizeof(float) * (size_t)tokens * hidden, stream);
    const dim3 block(32 * kWarps);
    allow_shared((const void*)gate_up_kernel, staged_bytes(hidden));
    allow_shared((const void*)down_kernel, staged_bytes(inter));
    gate_up_kernel<<<dim3((inter + kWarps - 1) / kWarps, pairs), block, staged_bytes(hidden), stream>>>(
        projs, num_experts, x, ids, top_k, hidden, inter, h);
    down_kernel<<<dim3((hidden + kWarps - 1) / kWarps, pairs), block, staged_bytes(inter), stream>>>(
        projs, num_experts, h, ids, weights, top_k, hidden, inter, 3, out);
    return (int)cudaGetLastError();
}

// y[T, out] = x[T, in] W^T for one packed projection `proj` (device memory) and T tokens (float32).
int moe_cuda_linear(const ProjDesc* proj, const float* x, const int64_t* zeros, const float* ones, int tokens,
                    int out_features, int in_features, float* y, cudaStream_t stream) {
    if (tokens == 0) return 0;
    cudaMemsetAsync(y, 0, sizeof(float) * (size_t)tokens * out_features, stream);
    allow_shared((const void*)down_kernel, staged_bytes(in_features));
    down_kernel<<<dim3((out_features + kWarps - 1) / kWarps, tokens), dim3(32 * kWarps), staged_bytes(in_features),
                  stream>>>(proj, 1, x, zeros, ones, 1, out_features, in_features, 1, y);
    return (int)cudaGetLastError();
}

}  // extern "C"
