// The native steps of the GEMM path (d > DIRECT_MAX_D) around the BLAS score product: the certified refinement of
// each row's candidates and the sparse output product. See denoise.h.
//
// Both run one row per work unit (OpenMP over rows, in baseline code) and call a multiversioned row function, so
// the inner loops are compiled for AVX-512 / AVX2+FMA / baseline and picked at load time, as in denoise.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/denoise.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace diffgen_fast {
namespace cpu {
namespace {

// ||x - a y||^2 as float64 differences, summed in coordinate order.
DIFFGEN_FAST_INLINE double sqdist64(const float* DIFFGEN_FAST_RESTRICT x, const float* DIFFGEN_FAST_RESTRICT y,
                                    std::int64_t d, double a) {
    double acc = 0.0;
    if (a == 1.0) {
#pragma omp simd reduction(+ : acc)
        for (std::int64_t k = 0; k < d; ++k) {
            const double t = static_cast<double>(x[k]) - static_cast<double>(y[k]);
            acc += t * t;
        }
    } else {
#pragma omp simd reduction(+ : acc)
        for (std::int64_t k = 0; k < d; ++k) {
            const double t = static_cast<double>(x[k]) - a * static_cast<double>(y[k]);
            acc += t * t;
        }
    }
    return acc;
}

// One row of refine_candidates; returns the row's candidate count (the row is left untouched above budget).
DIFFGEN_FAST_MULTIVERSION std::int64_t refine_row(float* T, std::int64_t n, const float* x, const float* Y,
                                                  std::int64_t d, double a, double xx, float lo, std::int64_t budget,
                                                  double* shift, std::int64_t* idx, double* texact) {
    std::int64_t c = 0;
    for (std::int64_t j = 0; j < n; ++j) {
        if (T[j] >= lo) {
            if (c < budget) idx[c] = j;
            ++c;
        }
    }
    if (c > budget || c == 0) return c;
    const double a2 = a * a;
    double best = -std::numeric_limits<double>::infinity();
    for (std::int64_t r = 0; r < c; ++r) {
        const double t = (xx - sqdist64(x, Y + idx[r] * d, d, a)) / a2;
        texact[r] = t;
        best = std::max(best, t);
    }
    const float fs = static_cast<float>(best);
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) T[j] -= fs;
    for (std::int64_t r = 0; r < c; ++r) T[idx[r]] = static_cast<float>(texact[r] - best);
    *shift = best;
    return c;
}

// Row threshold and count of sparse_pv: entries >= max * tail_w (and > 0).
DIFFGEN_FAST_MULTIVERSION std::int64_t pv_count(const float* W, std::int64_t n, float tail_w, float* thr) {
    float wmax = 0.0f;
#pragma omp simd reduction(max : wmax)
    for (std::int64_t j = 0; j < n; ++j) wmax = W[j] > wmax ? W[j] : wmax;
    const float t = std::max(wmax * tail_w, std::numeric_limits<float>::min());
    std::int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (std::int64_t j = 0; j < n; ++j) c += W[j] >= t ? 1 : 0;
    *thr = wmax > 0.0f ? t : std::numeric_limits<float>::infinity();
    return c;
}

// o[:] += sum over W[j] >= thr of W[j] y_j, in float64 (four points per pass over o).
DIFFGEN_FAST_MULTIVERSION void pv_row(const float* W, std::int64_t n, float thr, const float* Y, std::int64_t d,
                                      double* o, std::int64_t* idx) {
    std::int64_t c = 0;
    for (std::int64_t j = 0; j < n; ++j)
        if (W[j] >= thr) idx[c++] = j;
    std::int64_t r = 0;
    for (; r + 4 <= c; r += 4) {
        const float* y0 = Y + idx[r] * d;
        const float* y1 = Y + idx[r + 1] * d;
        const float* y2 = Y + idx[r + 2] * d;
        const float* y3 = Y + idx[r + 3] * d;
        const double w0 = W[idx[r]], w1 = W[idx[r + 1]], w2 = W[idx[r + 2]], w3 = W[idx[r + 3]];
#pragma omp simd
        for (std::int64_t k = 0; k < d; ++k)
            o[k] += (w0 * static_cast<double>(y0[k]) + w1 * static_cast<double>(y1[k])) +
                    (w2 * static_cast<double>(y2[k]) + w3 * static_cast<double>(y3[k]));
    }
    for (; r < c; ++r) {
        const float* y0 = Y + idx[r] * d;
        const double w0 = W[idx[r]];
#pragma omp simd
        for (std::int64_t k = 0; k < d; ++k) o[k] += w0 * static_cast<double>(y0[k]);
    }
}

}  // namespace

void refine_candidates(float* T, std::int64_t M, std::int64_t n, std::int64_t ldT, const float* x, const float* Y,
                       std::int64_t d, const double* alpha, const double* xx, const float* lo, std::int64_t budget,
                       double* shift, std::int64_t* count) {
    const int threads = get_num_threads();
    const std::int64_t cap = std::max<std::int64_t>(std::min(budget, n), 1);
    const long long work = static_cast<long long>(M) * n;
#pragma omp parallel num_threads(threads) if (threads > 1 && M > 1 && work >= kParallelMinWork)
    {
        std::vector<std::int64_t> idx(static_cast<std::size_t>(cap));
        std::vector<double> texact(static_cast<std::size_t>(cap));
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t i = 0; i < M; ++i) {
            shift[i] = 0.0;
            count[i] = refine_row(T + i * ldT, n, x + i * d, Y, d, alpha[i], xx[i], lo[i], budget, shift + i,
                                  idx.data(), texact.data());
        }
    }
}

std::int64_t sparse_pv(const float* W, std::int64_t M, std::int64_t n, std::int64_t ldW, const float* Y,
                       std::int64_t d, double* o, double tail_w, std::int64_t max_nnz) {
    const int threads = get_num_threads();
    const long long work = static_cast<long long>(M) * n;
    std::vector<float> thr(static_cast<std::size_t>(M));
    std::vector<std::int64_t> cnt(static_cast<std::size_t>(M));
    const float tw = static_cast<float>(tail_w);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && work >= kParallelMinWork)
    for (std::int64_t i = 0; i < M; ++i) cnt[i] = pv_count(W + i * ldW, n, tw, &thr[i]);
    std::int64_t nnz = 0, most = 0;
    for (std::int64_t i = 0; i < M; ++i) {
        nnz += cnt[i];
        most = std::max(most, cnt[i]);
    }
    if (nnz > max_nnz) return -1;
    if (nnz == 0) return 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && M > 1 && nnz * d >= kParallelMinWork)
    {
        std::vector<std::int64_t> idx(static_cast<std::size_t>(most));
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t i = 0; i < M; ++i) {
            if (cnt[i] > 0) pv_row(W + i * ldW, n, thr[i], Y, d, o + i * d, idx.data());
        }
    }
    return nnz;
}

}  // namespace cpu
}  // namespace diffgen_fast
