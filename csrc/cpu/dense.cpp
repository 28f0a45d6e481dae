// Dense GEMV for a model's unquantized linear layers (attention, LM head) at decode: float32 activations and
// float32 accumulation over weights stored as float32 or bfloat16. A bfloat16 weight widens to float32 exactly
// (a 16-bit shift), so y equals the float32 product of the same weights to float32 rounding, from half the bytes.
// Each weight row is read once per call for up to kDenseTokens tokens (decode is bound by the bytes read).
#include "dense_tile.h"
#include "packed.h"

namespace moecpu {

constexpr int kDenseTokens = 8;  // tokens per pass over the weights

namespace {

#define DENSE_AVX2 __attribute__((target("avx2,fma")))

template <bool BF16>
DENSE_AVX2 inline __m256 load8(const void* row, int64_t k) {
    if constexpr (BF16) {
        const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)row + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        return _mm256_loadu_ps((const float*)row + k);
    }
}

template <bool BF16, int R, int T>
DENSE_AVX2 void tile_avx2(const void* w, int64_t ld, const float* x, int64_t K, float* out, int64_t ldo) {
    using W = std::conditional_t<BF16, uint16_t, float>;
    const W* rows = (const W*)w;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
        for (int r = 0; r < R; ++r) {
            const __m256 wv = load8<BF16>(rows + r * ld, k);
            for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(xv[t], wv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float tail = 0.f;
            for (int64_t j = k; j < K; ++j) tail += weight_at<BF16>(rows + r * ld, j) * x[t * K + j];
            out[t * ldo + r] = hsum8(acc[r][t]) + tail;
        }
}

template <bool BF16, int R, int T>
void tile_scalar(const void* w, int64_t ld, const float* x, int64_t K, float* out, int64_t ldo) {
    using W = std::conditional_t<BF16, uint16_t, float>;
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; ++k) acc += weight_at<BF16>((const W*)w + r * ld, k) * x[t * K + k];
            out[t * ldo + r] = acc;
        }
}

using TileFn = void (*)(const void*, int64_t, const float*, int64_t, float*, int64_t);

// Rows per tile for T tokens: R * T accumulators within the 16 (AVX2) or 32 (AVX-512) vector registers.
constexpr int rows_for(int T) { return T <= 2 ? 4 : T <= 4 ? 3 : 2; }

template <bool BF16, int T>
TileFn tile_fn(bool single_row) {
    constexpr int R = rows_for(T);
    if (has_avx512()) return single_row ? tile_avx512<BF16, 1, T> : tile_avx512<BF16, R, T>;
    if (has_avx2()) return single_row ? tile_avx2<BF16, 1, T> : tile_avx2<BF16, R, T>;
    return single_row ? tile_scalar<BF16, 1, T> : tile_scalar<BF16, R, T>;
}

// The tile kernel for T tokens on this CPU, chosen per call (the MOECOMPRESS_NO_* switches of packed.h apply).
template <bool BF16>
TileFn pick(int T, bool single_row) {
    switch (T) {
        case 1: return tile_fn<BF16, 1>(single_row);
        case 2: return tile_fn<BF16, 2>(single_row);
        case 3: return tile_fn<BF16, 3>(single_row);
        case 4: return tile_fn<BF16, 4>(single_row);
        case 5: return tile_fn<BF16, 5>(single_row);
        case 6: return tile_fn<BF16, 6>(single_row);
        case 7: return tile_fn<BF16, 7>(single_row);
        default: return tile_fn<BF16, 8>(single_row);
    }
}

// y[T, N] = x[T, K] W^T (+ bias) for T <= kDenseTokens: tiles of rows split across threads, leftover rows one by one.
void dense_pass(const void* w, bool bf16, const float* bias, int N, int64_t K, const float* x, int T, float* y) {
    const int R = rows_for(T);
    const TileFn tile = bf16 ? pick<true>(T, false) : pick<false>(T, false);
    const TileFn one = bf16 ? pick<true>(T, true) : pick<false>(T, true);
    const size_t row_bytes = (size_t)K * (bf16 ? 2 : 4);
    const int tiles = N / R, rows = tiles * R;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < tiles + (N - rows); ++i) {
        const int n0 = i < tiles ? i * R : rows + (i - tiles), r = i < tiles ? R : 1;
        (i < tiles ? tile : one)((const char*)w + (size_t)n0 * row_bytes, K, x, K, y + n0, N);
        if (bias)
            for (int j = 0; j < r; ++j)
                for (int t = 0; t < T; ++t) y[(int64_t)t * N + n0 + j] += bias[n0 + j];
    }
}

}  // namespace

}  // namespace moecpu

extern "C" {

// y[T, N] = x[T, K] W^T (+ bias): W [N, K] row-major, float32 (bf16 = 0) or bfloat16 (bf16 = 1); bias float32 or
// null. Any T, kDenseTokens tokens per pass over the weights (meant for decode: a few tokens).
void moe_dense_linear(const void* w, int32_t bf16, const float* bias, int32_t N, int32_t K, const float* x, int64_t T,
                      float* y) {
    for (int64_t t0 = 0; t0 < T; t0 += moecpu::kDenseTokens) {
        const int n = (int)(T - t0 < moecpu::kDenseTokens ? T - t0 : moecpu::kDenseTokens);
        moecpu::dense_pass(w, bf16 != 0, bias, N, K, x + t0 * K, n, y + t0 * N);
    }
}

}  // extern "C"
