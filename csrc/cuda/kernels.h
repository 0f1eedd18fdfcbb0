// Launchers of the native CUDA kernels (csrc/cuda/*.cu), callable from plain C++ (csrc/cuda/bindings_cuda.cpp is
// compiled by the host compiler and includes no CUDA header). Every pointer is a device pointer allocated by torch;
// `stream` is a cudaStream_t passed as void* (0: the legacy default stream). Each launcher enqueues its kernels on
// that stream, checks cudaGetLastError, and returns "" on success or the CUDA error text; it never synchronizes.
// Arguments are validated by the bindings before a launcher is called; the launchers assume valid arguments.
#pragma once

#include <cstdint>
#include <string>

namespace diffgen_fast {
namespace cuda {

// Largest k of select_topk (the bitonic sort of the selected candidates runs in shared memory).
constexpr int kSelectMaxK = 2048;
// Largest d of the fused small-d softmax kernel (one query per thread, the query and o in registers).
constexpr int kSoftmaxMaxD = 64;

// out[i, j] = sum_c (x[i, c] - y[j, c])^2 as direct differences, fp32 (T = float) or fp64 (T = double)
// arithmetic, stored as float (rounded to nearest). x [M, d], y [n, d], out [M, n], all row-major contiguous.
std::string launch_sqdist_f32(const float* x, const float* y, float* out, std::int64_t M, std::int64_t n,
                              std::int64_t d, void* stream);
std::string launch_sqdist_f64(const double* x, const double* y, float* out, std::int64_t M, std::int64_t n,
                              std::int64_t d, void* stream);

// Per row of dist [M, n] (fp32, no NaN): the k smallest entries by (value, column), ascending, into
// vals [M, k] (float) and idx [M, k] (int64 column numbers). 1 <= k <= min(n, kSelectMaxK), n < 2^31.
std::string launch_select_topk(const float* dist, float* vals, std::int64_t* idx, std::int64_t M, std::int64_t n,
                               int k, void* stream);

// out[i, j] = ||x[i] - y[idx[i, j]]||^2 in float64 (differences of the values converted to double, fma
// accumulation). x [M, d], y [n, d] of T, idx [M, c] int64 with 0 <= idx < n (an index outside gives NaN).
std::string launch_sqdist_pairs_f32(const float* x, const float* y, const std::int64_t* idx, double* out,
                                    std::int64_t M, std::int64_t n, std::int64_t c, std::int64_t d, void* stream);
std::string launch_sqdist_pairs_f64(const double* x, const double* y, const std::int64_t* idx, double* out,
                                    std::int64_t M, std::int64_t n, std::int64_t c, std::int64_t d, void* stream);

// Partial softmax states of the small-d fused kernel (1 <= d <= kSoftmaxMaxD), N split into `splits` ranges of
// `per_split` points (the last may be shorter or empty): for split s and query i,
//   z_j = -||x_i - alpha_i y_j||^2 * c2_i     (c2 = 1 / (2 sigma^2), given in float64)
//   m[s, i] = max z_j (float64; -inf for an empty range), l[s, i] = sum exp(z_j - m), q[s, i] = sum exp(2(z_j - m))
//   o[s, i, :] = sum exp(z_j - m) y_j  (fp32; only when o != nullptr)
// x [M, d] float, y [n, d] float, alpha / c2 [M] double; m, l, q [splits, M] double; o [splits, M, d] float.
// exact: differences and squared distance in float64, exp in float64; else fp32 distances and expf.
std::string launch_softmax_state(const float* x, const float* y, const double* alpha, const double* c2, double* m,
                                 double* l, double* q, float* o, std::int64_t M, std::int64_t n, int d,
                                 std::int64_t splits, std::int64_t per_split, bool exact, void* stream);

// Runtime queries for build_info; they never throw. On failure `error` gets the CUDA error name and text.
int runtime_version(std::string* error);  // cudaRuntimeGetVersion (the statically linked cudart)
int driver_version(std::string* error);   // cudaDriverGetVersion (0 when no driver is installed)
int device_count(std::string* error);     // cudaGetDeviceCount (-1 on error)

}  // namespace cuda
}  // namespace diffgen_fast
