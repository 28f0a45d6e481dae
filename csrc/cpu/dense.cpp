// Dense GEMV for a model's unquantized linear layers (attention, LM head) at decode: float32 activations and
// float32 accumulation over weights stored as float32 or bfloat16. A bfloat16 weight widens to float32 exactly
// (a 16-bit shift), so y equals the float32 product of the same weights to float32 rounding, from half the bytes.
// Each weight row is read once per call for up to kDenseTokens tokens (decode is bound by the bytes read).
#include <vector>

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
            // A row is a few KiB, too short for the hardware prefetchers to ramp up on R streams at once: the same
            // columns of the rows two tiles on are fetched meanwhile (a prefetch past the last row is harmless;
            // 1024 x 1024 out of the cache, 1 thread: bfloat16 316 -> 189 us, float32 285 -> 251 us).
            _mm_prefetch((const char*)(rows + (r + 2 * R) * ld + k), _MM_HINT_T0);
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

// bfloat16 rows on AVX2: one 32-byte load holds 16 weights, each 32-bit lane two of them: shifted up 16 bits the
// even one, masked the odd one, both exact float32 with no lane shuffle. The activations come split the same way
// (`split_even_odd`: per 16 values the 8 even ones, then the 8 odd ones; a tail shorter than 16 as it is).
template <int R, int T>
DENSE_AVX2 void tile_avx2_bf16(const void* w, int64_t ld, const float* xs, int64_t K, float* out, int64_t ldo) {
    const uint16_t* rows = (const uint16_t*)w;
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xe[T], xo[T];
        for (int t = 0; t < T; ++t) xe[t] = _mm256_loadu_ps(xs + t * K + k), xo[t] = _mm256_loadu_ps(xs + t * K + k + 8);
        for (int r = 0; r < R; ++r) {
            _mm_prefetch((const char*)(rows + (r + 2 * R) * ld + k), _MM_HINT_T0);  // as in tile_avx2
            const __m256i v = _mm256_loadu_si256((const __m256i*)(rows + r * ld + k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
            for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(xo[t], wo, _mm256_fmadd_ps(xe[t], we, acc[r][t]));
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float tail = 0.f;
            for (int64_t j = k; j < K; ++j) tail += weight_at<true>(rows + r * ld, j) * xs[t * K + j];
            out[t * ldo + r] = hsum8(acc[r][t]) + tail;
        }
}

// x [T, K] split for `tile_avx2_bf16` into xs [T, K].
void split_even_odd(const float* x, int T, int64_t K, float* xs) {
    for (int t = 0; t < T; ++t) {
        const float* in = x + t * K;
        float* to = xs + t * K;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int i = 0; i < 8; ++i) to[k + i] = in[k + 2 * i], to[k + 8 + i] = in[k + 2 * i + 1];
        for (; k < K; ++k) to[k] = in[k];
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

// Whether bfloat16 rows take `tile_avx2_bf16` on this CPU (and so split activations).
bool split_bf16() { return !has_avx512() && has_avx2(); }

template <bool BF16, int T>
TileFn tile_fn(bool single_row) {
    constexpr int R = rows_for(T);
    if (has_avx512()) return single_row ? tile_avx512<BF16, 1, T> : tile_avx512<BF16, R, T>;
    if (BF16 && has_avx2()) return single_row ? tile_avx2_bf16<1, T> : tile_avx2_bf16<R, T>;
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

// One weight of a multi-weight pass: W [N, K] float32 or bfloat16, bias or null, its output y [T, N].
struct DenseWeight {
    const void* w;
    bool bf16;
    const float* bias;
    int N;
    float* y;
};

// y_m[T, N_m] = x[T, K] W_m^T (+ bias_m) for T <= kDenseTokens and weights sharing x (a layer's q, k and v): the
// tiles of rows of every weight, then their leftover rows one by one, in one parallel loop (one fork and join for
// all of them, the weights read in one stream).
void dense_pass(const DenseWeight* m, int count, int64_t K, const float* x, int T) {
    const int R = rows_for(T);
    std::vector<int> first(count + 1, 0);  // work items first[i] .. first[i+1]-1: weight i's tiles and leftover rows
    for (int i = 0; i < count; ++i) first[i + 1] = first[i] + m[i].N / R + m[i].N % R;
    std::vector<float> split;
    const float* xs = x;  // bfloat16 rows take the activations split (see tile_avx2_bf16)
    for (int i = 0; i < count && split.empty(); ++i)
        if (m[i].bf16 && split_bf16()) {
            split.resize((size_t)T * K);
            split_even_odd(x, T, K, split.data());
            xs = split.data();
        }
    // [bf16][single row]: chosen once (each choice reads the environment's ISA switches)
    const TileFn fns[2][2] = {{pick<false>(T, false), pick<false>(T, true)}, {pick<true>(T, false), pick<true>(T, true)}};
#pragma omp parallel for schedule(static)
    for (int item = 0; item < first[count]; ++item) {
        int i = 0;
        while (item >= first[i + 1]) ++i;
        const DenseWeight& d = m[i];
        const int j = item - first[i], tiles = d.N / R, rows = tiles * R;
        const int n0 = j < tiles ? j * R : rows + (j - tiles), r = j < tiles ? R : 1;
        fns[d.bf16][j >= tiles]((const char*)d.w + (size_t)n0 * (size_t)K * (d.bf16 ? 2 : 4), K, d.bf16 ? xs : x, K, d.y + n0, d.N);
        if (d.bias)
            for (int q = 0; q < r; ++q)
                for (int t = 0; t < T; ++t) d.y[(int64_t)t * d.N + n0 + q] += d.bias[n0 + q];
    }
}

}  // namespace

}  // namespace moecpu

extern "C" {

// y[i][T, N[i]] = x[T, K] W_i^T (+ bias_i) for `count` weights W_i [N[i], K] sharing x (one, or a layer's q, k and
// v), row-major, float32 (bf16[i] = 0) or bfloat16 (1); biases float32 or null. Any T, kDenseTokens tokens per pass
// over the weights (meant for decode: a few tokens), the rows of all the weights in one parallel loop.
void moe_dense_linears(int32_t count, const void* const* w, const int32_t* bf16, const float* const* bias,
                       const int32_t* N, int32_t K, const float* x, int64_t T, float* const* y) {
    std::vector<moecpu::DenseWeight> m((size_t)count);
    for (int64_t t0 = 0; t0 < T; t0 += moecpu::kDenseTokens) {
        const int n = (int)(T - t0 < moecpu::kDenseTokens ? T - t0 : moecpu::kDenseTokens);
        for (int i = 0; i < count; ++i) m[i] = {w[i], bf16[i] != 0, bias[i], N[i], y[i] + t0 * N[i]};
        moecpu::dense_pass(m.data(), count, K, x + t0 * K, n);
    }
}

}  // extern "C"
