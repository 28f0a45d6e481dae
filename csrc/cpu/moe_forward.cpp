// The C ABI of the CPU expert kernels (built by moecompress/runtime/native.py with g++ into a cache, called
// through ctypes; no torch headers) and the fused MoE layer forward: gate/up -> gated activation -> down ->
// weighted sum over the active experts, in one call, each expert in its own format, with the projections' biases
// where they have them (GPT-OSS).
//
// Experts with at most `q8_tokens` tokens (decode) run on the int8-activation kernels (gemv_q8.cpp) in one
// OpenMP region: all their gate/up rows, then the activations, then all down rows, split into one contiguous
// run of row tiles per thread, so that the cores share work across experts and formats without a barrier per
// expert. Other
// experts (prefill, or formats the int8 kernels do not take) run one at a time on the float32 kernels.
#include <math.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "packed.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moecpu {

namespace {

using Routed = std::vector<std::vector<std::pair<int64_t, float>>>;  // expert -> (token, routing weight)

// The experts' gated activation h = act(gate, up): SiLU(gate) * up, or GPT-OSS's clamped SwiGLU
// (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g) with g = min(gate, l).
struct Activation {
    int32_t kind;  // 0: SiLU-gated, 1: clamped SwiGLU
    float alpha, limit;
};

// h = act(gate + gate bias, up + up bias), written over gate; n values of one (token, expert) row.
void gated(const Activation& act, const ProjDesc* proj, float* g, float* u, int n) {
    if (proj[0].bias)
        for (int j = 0; j < n; ++j) g[j] += proj[0].bias[j];
    if (proj[1].bias)
        for (int j = 0; j < n; ++j) u[j] += proj[1].bias[j];
    if (act.kind == 0) {
        for (int j = 0; j < n; ++j) g[j] = g[j] / (1.f + expf(-g[j])) * u[j];
        return;
    }
    for (int j = 0; j < n; ++j) {
        const float x = fminf(g[j], act.limit), y = fminf(fmaxf(u[j], -act.limit), act.limit);
        g[j] = (y + 1.f) * x / (1.f + expf(-act.alpha * x));
    }
}

// out[h] += w * (y[h] + down bias[h]) for h in [h0, h1).
inline void accumulate(float* out, float w, const float* y, const float* bias, int h0, int h1) {
    if (bias)
        for (int h = h0; h < h1; ++h) out[h] += w * (y[h] + bias[h]);
    else
        for (int h = h0; h < h1; ++h) out[h] += w * y[h];
}
constexpr int kTile = 64;                                             // rows per scheduled work item
constexpr int64_t kMaxSlots = 4096;  // (token, expert) pairs per int8 pass: 4096 x (2 inter + hidden) floats

// Quantized activation vectors of width K, `stride` bytes and `floats` floats apart, each in its own layout.
struct Acts {
    int64_t K, stride = 0, floats = 0;
    std::vector<int8_t> q;
    std::vector<float> f;
    std::vector<Q8Layout> layout;

    Acts(int64_t width, int64_t count) : K(width), layout((size_t)count, Q8Layout{64, 64}) {
        for (Q8Layout l : {Q8Layout{64, 64}, Q8Layout{128, 64}, Q8Layout{256, 64}, Q8Layout{32, 32}, Q8Layout{64, 32},
                           Q8Layout{128, 32}}) {
            stride = std::max(stride, (K + l.chunk - 1) / l.chunk * l.chunk);
            floats = std::max(floats, (int64_t)q8_act_floats(K, l));
        }
        q.resize((size_t)(stride * count));
        f.resize((size_t)(floats * count));
    }
    void quantize(int64_t i, const float* x, Q8Layout l) {
        layout[i] = l;
        q8_quantize(x, K, l, &q[i * stride], &f[i * floats], &f[i * floats + q8_dvec_floats(K, l)]);
    }
    QAct at(int64_t i) const { return {&q[i * stride], &f[i * floats], &f[i * floats + q8_dvec_floats(K, layout[i])]}; }
};

// y[i, n] for rows [n0, n1) of `d` and the `count` activations `a`, kMaxTokens per pass over the rows.
void rows_for(const ProjDesc& d, int n0, int n1, const QAct* a, int64_t count, float* y) {
    thread_local std::vector<float> xsum;
    xsum.resize((size_t)kMaxTokens * d.groups);
    for (int64_t t0 = 0; t0 < count; t0 += kMaxTokens) {
        const int T = (int)(count - t0 < kMaxTokens ? count - t0 : kMaxTokens);
        q8_group_sums(d, a + t0, T, xsum.data());
        q8_rows(d, n0, n1, a + t0, xsum.data(), T, y + t0 * d.out_features, d.out_features);
    }
}

int tiles(int rows) { return (rows + kTile - 1) / kTile; }

// Inside a parallel region: fn(i) for the items [0, count) split into one contiguous run per thread of about
// equal cost (bytes read), then a barrier. Long sequential runs keep the prefetchers streaming (measured:
// a quarter faster than dynamic scheduling of the same tiles on fresh weights), and mixed formats still
// share the work evenly.
template <class Cost, class Fn>
void split_runs(int count, Cost cost, Fn fn) {
#ifdef _OPENMP
    const int threads = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int threads = 1, id = 0;
#endif
    double total = 0.;
    for (int i = 0; i < count; ++i) total += cost(i);
    const double lo = total * id / threads, hi = total * (id + 1) / threads;
    double before = 0.;
    for (int i = 0; i < count; ++i) {
        const double c = cost(i), mid = before + c / 2;
        if (mid >= lo && mid < hi) fn(i);
        before += c;
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
}

double tile_cost(const ProjDesc& d, int n0) {
    const int rows = d.out_features - n0 < kTile ? d.out_features - n0 : kTile;
    return (double)rows * (double)(d.row_bytes + 3 * d.groups);
}

// The distinct activation layouts of a set of projections, numbered in order of first sight.
struct Layouts {
    std::vector<int> number = std::vector<int>(kQ8Layouts, -1);  // layout id -> its number, or -1
    std::vector<Q8Layout> list;

    int add(int bits) {  // the number of the layout of `bits`-wide codes, added on first sight
        const Q8Layout l = q8_layout(bits);
        int& k = number[q8_layout_id(l)];
        if (k < 0) k = (int)list.size(), list.push_back(l);
        return k;
    }
    int of(int bits) const { return number[q8_layout_id(q8_layout(bits))]; }
};

// The experts `experts` (each with its tokens in `routed`) on the int8 kernels, added into out.
void q8_experts(const ProjDesc* projs, const std::vector<int>& experts, const Routed& routed, const float* x,
                int64_t T, int hidden, int inter, const Activation& act, float* out) {
    const int n = (int)experts.size();
    std::vector<int64_t> first(n + 1, 0);  // slots first[i] .. first[i+1]-1: expert i's (token, weight) pairs
    for (int i = 0; i < n; ++i) first[i + 1] = first[i] + (int64_t)routed[experts[i]].size();
    const int64_t slots = first[n];
    Layouts layouts;  // of the gate/up projections
    for (int e : experts)
        for (int p = 0; p < 2; ++p) layouts.add(projs[3 * e + p].bits);
    const int kinds = (int)layouts.list.size();
    std::vector<int64_t> row_of((size_t)T, -1), tokens;  // token -> its row among the quantized inputs
    for (int e : experts)
        for (const auto& pr : routed[e])
            if (row_of[pr.first] < 0) row_of[pr.first] = (int64_t)tokens.size(), tokens.push_back(pr.first);
    const int64_t U = (int64_t)tokens.size();
    Acts in(hidden, kinds * U), mid(inter, slots);  // inputs: one row per (layout, token)
    std::vector<float> gate((size_t)(slots * inter)), up((size_t)(slots * inter)), down((size_t)(slots * hidden));
    const int up_tiles = tiles(inter), down_tiles = tiles(hidden);
#pragma omp parallel
    {
        std::vector<QAct> a;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < U; ++r)
            for (int k = 0; k < kinds; ++k) in.quantize(k * U + r, x + tokens[r] * hidden, layouts.list[k]);
        split_runs(
            n * 2 * up_tiles,
            [&](int w) { return tile_cost(projs[3 * experts[w / (2 * up_tiles)] + w / up_tiles % 2], w % up_tiles * kTile); },
            [&](int w) {
                const int i = w / (2 * up_tiles), p = w / up_tiles % 2, n0 = w % up_tiles * kTile;
                const ProjDesc& d = projs[3 * experts[i] + p];
                a.clear();
                for (const auto& pr : routed[experts[i]])
                    a.push_back(in.at(layouts.of(d.bits) * U + row_of[pr.first]));
                float* y = (p ? up : gate).data() + first[i] * inter;
                rows_for(d, n0, std::min(n0 + kTile, inter), a.data(), (int64_t)a.size(), y);
            });
#pragma omp for schedule(static)
        for (int i = 0; i < n; ++i)
            for (int64_t s = first[i]; s < first[i + 1]; ++s) {
                float* g = &gate[s * inter];
                gated(act, projs + 3 * experts[i], g, &up[s * inter], inter);
                mid.quantize(s, g, q8_layout(projs[3 * experts[i] + 2].bits));
            }
        split_runs(
            n * down_tiles, [&](int w) { return tile_cost(projs[3 * experts[w / down_tiles] + 2], w % down_tiles * kTile); },
            [&](int w) {
                const int i = w / down_tiles, n0 = w % down_tiles * kTile;
                a.clear();
                for (int64_t s = first[i]; s < first[i + 1]; ++s) a.push_back(mid.at(s));
                rows_for(projs[3 * experts[i] + 2], n0, std::min(n0 + kTile, hidden), a.data(), (int64_t)a.size(),
                         down.data() + first[i] * hidden);
            });
#pragma omp for schedule(static)
        for (int h0 = 0; h0 < hidden; h0 += 256)
            for (int i = 0; i < n; ++i)
                for (int64_t s = first[i]; s < first[i + 1]; ++s) {
                    const auto& pr = routed[experts[i]][s - first[i]];
                    accumulate(out + pr.first * hidden, pr.second, &down[s * hidden], projs[3 * experts[i] + 2].bias,
                               h0, std::min(h0 + 256, hidden));
                }
    }
}

// One expert on the float32 kernels, added into out.
void f32_expert(const ProjDesc* proj, const std::vector<std::pair<int64_t, float>>& pairs, const float* x, int hidden,
                int inter, const Activation& act, float* out) {
    const int64_t n = (int64_t)pairs.size();
    std::vector<float> xs((size_t)n * hidden), gate((size_t)n * inter), up((size_t)n * inter), down((size_t)n * hidden);
    for (int64_t i = 0; i < n; ++i) memcpy(&xs[(size_t)i * hidden], x + pairs[i].first * hidden, sizeof(float) * hidden);
    project_f32(proj[0], xs.data(), n, gate.data());
    project_f32(proj[1], xs.data(), n, up.data());
    for (int64_t i = 0; i < n; ++i) gated(act, proj, &gate[(size_t)i * inter], &up[(size_t)i * inter], inter);
    project_f32(proj[2], gate.data(), n, down.data());
    for (int64_t i = 0; i < n; ++i)
        accumulate(out + pairs[i].first * hidden, pairs[i].second, &down[(size_t)i * hidden], proj[2].bias, 0, hidden);
}

}  // namespace

}  // namespace moecpu

using namespace moecpu;

extern "C" {

// 4: AVX-512 with VNNI/VBMI (int8 activations), 3: AVX-512 path, 2: AVX2+FMA path (int8 activations for 2-, 4-
// and 8-bit codes), 1: portable path.
int moe_cpu_isa() { return has_q8() ? 4 : has_avx512() ? 3 : has_avx2() ? 2 : 1; }

// 1 where this CPU runs projection `d` with int8 activations.
int moe_q8_fits(const ProjDesc* d) { return q8_fits(*d) ? 1 : 0; }

// The field names of ProjDesc in declaration order, comma-separated, and (moe_proj_desc_layout) sizeof(ProjDesc)
// followed by each field's offset in that order: runtime/native.py compares them by name with its ctypes mirror.
const char* moe_proj_desc_names() {
#define MOE_NAME(field) #field ","
    return MOE_PROJ_DESC_FIELDS(MOE_NAME);
#undef MOE_NAME
}

void moe_proj_desc_layout(int64_t* out) {
    int i = 0;
    out[i++] = (int64_t)sizeof(ProjDesc);
#define MOE_OFFSET(field) out[i++] = (int64_t)offsetof(ProjDesc, field);
    MOE_PROJ_DESC_FIELDS(MOE_OFFSET)
#undef MOE_OFFSET
}

// y[i][T, out_i] = x[T, in] W_i^T (+ bias_i) for `count` packed projections sharing x (one, or a layer's q, k and
// v), any T; int8 activations where `q8` and every format allows, quantized once per layout, and the rows of all the
// projections in one parallel loop.
void moe_packed_linears(int32_t count, const ProjDesc* d, const float* x, int64_t T, int32_t q8, float* const* y) {
    bool fits = q8 != 0;
    for (int i = 0; i < count; ++i) fits = fits && q8_fits(d[i]);
    if (!fits) {
        for (int i = 0; i < count; ++i) project_f32(d[i], x, T, y[i]);
    } else {
        Layouts layouts;
        std::vector<int> first(count + 1, 0), row(count);  // projection i's first tile and its activations' row
        for (int i = 0; i < count; ++i) {
            row[i] = layouts.add(d[i].bits) * (int)T;
            first[i + 1] = first[i] + tiles(d[i].out_features);
        }
        Acts acts(d[0].in_features, (int64_t)layouts.list.size() * T);
        for (size_t k = 0; k < layouts.list.size(); ++k)
            for (int64_t t = 0; t < T; ++t) acts.quantize((int64_t)k * T + t, x + t * d[0].in_features, layouts.list[k]);
#pragma omp parallel
        {
            std::vector<QAct> a((size_t)T);
#pragma omp for schedule(static)
            for (int w = 0; w < first[count]; ++w) {
                int i = 0;
                while (w >= first[i + 1]) ++i;
                for (int64_t t = 0; t < T; ++t) a[t] = acts.at(row[i] + t);
                const int n0 = (w - first[i]) * kTile;
                rows_for(d[i], n0, std::min(n0 + kTile, d[i].out_features), a.data(), T, y[i]);
            }
        }
    }
    for (int i = 0; i < count; ++i)
        if (d[i].bias)
            for (int64_t t = 0; t < T; ++t)
                accumulate(y[i] + t * d[i].out_features, 1.f, d[i].bias, nullptr, 0, d[i].out_features);
}

// One MoE layer: out[T, H] = sum_k w[t, k] * down_e(act(gate_e(x_t), up_e(x_t))), e = ids[t, k], over the
// experts `projs[3e .. 3e+2]` (gate, up, down; each expert its own format, each projection with its bias if it
// has one). act: `act_kind` 0 SiLU(gate) * up, 1 clamped SwiGLU (`alpha`, `limit`). Ids outside [0, E) are
// skipped. Experts with at most `q8_tokens` tokens run with int8 activations where the CPU and formats allow.
void moe_experts_forward(const ProjDesc* projs, int32_t num_experts, const float* x, const int64_t* ids,
                         const float* weights, int64_t T, int32_t K, int32_t hidden, int32_t inter, int32_t q8_tokens,
                         int32_t act_kind, float alpha, float limit, float* out) {
    const Activation act{act_kind, alpha, limit};
    memset(out, 0, sizeof(float) * (size_t)T * hidden);
    Routed routed(num_experts);
    for (int64_t t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            const int64_t e = ids[t * K + k];
            if (e >= 0 && e < num_experts) routed[e].push_back({t, weights[t * K + k]});
        }
    std::vector<int> q8, f32;
    for (int e = 0; e < num_experts; ++e) {
        if (routed[e].empty()) continue;
        const bool fits = q8_fits(projs[3 * e]) && q8_fits(projs[3 * e + 1]) && q8_fits(projs[3 * e + 2]);
        ((int64_t)routed[e].size() <= q8_tokens && fits ? q8 : f32).push_back(e);
    }
    for (size_t i = 0; i < q8.size();) {  // passes of at most kMaxSlots (token, expert) pairs: bounded buffers
        std::vector<int> pass;
        for (int64_t slots = 0; i < q8.size() && (pass.empty() || slots + (int64_t)routed[q8[i]].size() <= kMaxSlots);)
            slots += (int64_t)routed[q8[i]].size(), pass.push_back(q8[i++]);
        q8_experts(projs, pass, routed, x, T, hidden, inter, act, out);
    }
    for (int e : f32) f32_expert(projs + 3 * e, routed[e], x, hidden, inter, act, out);
}

}  // extern "C"
