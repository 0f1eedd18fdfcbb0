// Native CUDA small-d fused softmax denoiser (the "cuda" softmax_denoise / kde backend, d <= 64).
//
// One query per thread (128 per block), training points in shared-memory tiles read by every thread of the block
// (a broadcast: all threads read the same address), the online softmax state (m, l, q, o[d]) in registers. The
// logit is z_j = -||x - alpha y_j||^2 * c2, c2 = 1 / (2 sigma^2) per query, from DIRECT differences
// (fma(-alpha, y, x) per coordinate), so there is no cancellation at small sigma. The training range of one call is
// split over blockIdx.y (flash-decoding style when M is small); each split writes its partial state and Python merges
// them with the SoftmaxState rule. Padded dimensions (d < DMAX) hold 0 in x and y and contribute nothing.
//
// Precision: EXACT computes the difference, the squared distance, the logit and exp in float64 (the training tile is
// converted to double once, in shared memory), o in fp32; otherwise fp32 differences, fp32 fma accumulation of the
// squared distance (relative error <= (d + 2) 2^-24) and expf. In both, m, l, q are float64 and a new maximum
// rescales the state (m = -inf is the empty state: the first point rescales by exp(-inf) = 0).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace diffgen_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <int DMAX, bool EXACT, bool NEED_OUT>
__global__ void __launch_bounds__(kThreads)
    softmax_state_kernel(const float* __restrict__ x, const float* __restrict__ y, const double* __restrict__ alpha,
                         const double* __restrict__ c2, double* __restrict__ m_out, double* __restrict__ l_out,
                         double* __restrict__ q_out, float* __restrict__ o_out, std::int64_t M, std::int64_t n,
                         int d, std::int64_t per_split) {
    using TS = typename std::conditional<EXACT, double, float>::type;
    constexpr int TN = 2048 / DMAX;  // points per tile: 8 KiB of fp32 (16 KiB of fp64)
    constexpr bool kSeparateF32 = EXACT && NEED_OUT;  // o needs the fp32 values; keep them beside the fp64 tile
    __shared__ TS ys[TN][DMAX];
    __shared__ float yf[kSeparateF32 ? TN : 1][DMAX];

    const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    const bool active = i < M;
    const std::int64_t split = blockIdx.y;
    const std::int64_t j0 = split * per_split;
    const std::int64_t j1 = (n - j0 < per_split) ? n : j0 + per_split;  // j0 may be >= n: an empty split

    TS xr[DMAX];
    TS a = TS(1);
    double cc = 0.0;
#pragma unroll
    for (int c = 0; c < DMAX; ++c) xr[c] = (active && c < d) ? static_cast<TS>(x[i * d + c]) : TS(0);
    if (active) {
        a = static_cast<TS>(alpha[i]);
        cc = c2[i];
    }
    double m = -INFINITY;
    double l = 0.0;
    double q = 0.0;
    float o[NEED_OUT ? DMAX : 1];
#pragma unroll
    for (int c = 0; c < (NEED_OUT ? DMAX : 1); ++c) o[c] = 0.0f;

    for (std::int64_t t0 = j0; t0 < j1; t0 += TN) {  // block-uniform bounds: every thread reaches the barriers
        const int cnt = static_cast<int>((j1 - t0 < TN) ? (j1 - t0) : TN);
        __syncthreads();  // the previous tile is consumed
        for (int e = threadIdx.x; e < TN * DMAX; e += kThreads) {
            const int r = e / DMAX;
            const int c = e % DMAX;
            const float v = (r < cnt && c < d) ? y[(t0 + r) * d + c] : 0.0f;
            ys[r][c] = static_cast<TS>(v);
            if (kSeparateF32) yf[kSeparateF32 ? r : 0][c] = v;
        }
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < cnt; ++r) {
            TS s = TS(0);
#pragma unroll
            for (int c = 0; c < DMAX; ++c) {
                const TS diff = fma(-a, ys[r][c], xr[c]);
                s = fma(diff, diff, s);
            }
            const double z = -static_cast<double>(s) * cc;
            if (z > m) {  // new maximum: rescale the state (exp(-inf) = 0 for the first point)
                const double sc = EXACT ? exp(m - z) : static_cast<double>(expf(static_cast<float>(m - z)));
                l = l * sc + 1.0;
                q = q * sc * sc + 1.0;
                if (NEED_OUT) {
                    const float scf = static_cast<float>(sc);
#pragma unroll
                    for (int c = 0; c < DMAX; ++c) {
                        const float yv = kSeparateF32 ? yf[kSeparateF32 ? r : 0][c] : static_cast<float>(ys[r][c]);
                        o[NEED_OUT ? c : 0] = fmaf(o[NEED_OUT ? c : 0], scf, yv);
                    }
                }
                m = z;
            } else if (z > -INFINITY) {
                const double p = EXACT ? exp(z - m) : static_cast<double>(expf(static_cast<float>(z - m)));
                l += p;
                q += p * p;
                if (NEED_OUT) {
                    const float pf = static_cast<float>(p);
#pragma unroll
                    for (int c = 0; c < DMAX; ++c) {
                        const float yv = kSeparateF32 ? yf[kSeparateF32 ? r : 0][c] : static_cast<float>(ys[r][c]);
                        o[NEED_OUT ? c : 0] = fmaf(pf, yv, o[NEED_OUT ? c : 0]);
                    }
                }
            }
        }
    }

    if (!active) return;
    const std::int64_t at = split * M + i;
    m_out[at] = m;
    l_out[at] = l;
    q_out[at] = q;
    if (NEED_OUT) {
#pragma unroll
        for (int c = 0; c < DMAX; ++c) {  // unrolled with a guard: a dynamic index would put o in local memory
            if (c < d) o_out[at * d + c] = o[NEED_OUT ? c : 0];
        }
    }
}

template <int DMAX, bool EXACT, bool NEED_OUT>
std::string launch_one(const float* x, const float* y, const double* alpha, const double* c2, double* m, double* l,
                       double* q, float* o, std::int64_t M, std::int64_t n, int d, std::int64_t splits,
                       std::int64_t per_split, cudaStream_t stream) {
    const std::int64_t blocks_m = (M + kThreads - 1) / kThreads;
    const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(splits));
    softmax_state_kernel<DMAX, EXACT, NEED_OUT>
        <<<grid, kThreads, 0, stream>>>(x, y, alpha, c2, m, l, q, o, M, n, d, per_split);
    const cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return std::string();
    return std::string("softmax_state_kernel: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

template <int DMAX>
std::string launch_dmax(const float* x, const float* y, const double* alpha, const double* c2, double* m, double* l,
                        double* q, float* o, std::int64_t M, std::int64_t n, int d, std::int64_t splits,
                        std::int64_t per_split, bool exact, cudaStream_t stream) {
    const bool need_out = o != nullptr;
    if (exact) {
        return need_out ? launch_one<DMAX, true, true>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, stream)
                        : launch_one<DMAX, true, false>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split,
                                                        stream);
    }
    return need_out ? launch_one<DMAX, false, true>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, stream)
                    : launch_one<DMAX, false, false>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, stream);
}

}  // namespace

std::string launch_softmax_state(const float* x, const float* y, const double* alpha, const double* c2, double* m,
                                 double* l, double* q, float* o, std::int64_t M, std::int64_t n, int d,
                                 std::int64_t splits, std::int64_t per_split, bool exact, void* stream) {
    if (M == 0 || splits == 0) return std::string();
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (d <= 8) return launch_dmax<8>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, exact, s);
    if (d <= 16) return launch_dmax<16>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, exact, s);
    if (d <= 32) return launch_dmax<32>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, exact, s);
    return launch_dmax<64>(x, y, alpha, c2, m, l, q, o, M, n, d, splits, per_split, exact, s);
}

}  // namespace cuda
}  // namespace diffgen_fast
