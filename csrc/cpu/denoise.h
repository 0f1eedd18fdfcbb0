// Native CPU kernels of the softmax-weighted denoiser (backend="cpu").
//
// Both kernels update a running softmax state in place, row i: m[i] (float64, the running max logit), l[i] = sum
// e^(z - m), q[i] = sum e^(2 (z - m)), o[i, :] = sum e^(z - m) y (float64), with logits
// z_ij = -||x_i - alpha_i y_j||^2 c_i, c_i = 1 / (2 sigma_i^2). Callers start from m = -inf, l = q = o = 0 and
// finalize with diffgen_fast.ops.merge.finalize_softmax_state; chunks of the training set are simply streamed
// through the same state.
#pragma once

#include <cstdint>

namespace diffgen_fast {
namespace cpu {

// Direct differences (accurate at every sigma, no norm expansion), for small d. x: [M, d]; yT: the training chunk
// transposed, [d, n] row-major (so loops over training points are contiguous), float32 or float64.
// exact = false: fp32 differences and sums (T = float); exact = true: differences and sums in float64. Weights are
// float (fp32 data) or double (fp64 data). o may be null (need_out false). c, alpha: float64 [M].
void denoise_direct(const float* x, const float* yT, std::int64_t M, std::int64_t n, std::int64_t d, const double* c,
                    const double* alpha, bool exact, double* m, double* l, double* q, double* o);
void denoise_direct(const double* x, const double* yT, std::int64_t M, std::int64_t n, std::int64_t d,
                    const double* c, const double* alpha, bool exact, double* m, double* l, double* q, double* o);

// Epilogue of the GEMM path (large d): S [M, n] holds T_ij = (2 / alpha_i) x_i.y_j - ||y_j||^2 (computed by the
// caller's GEMM, in T = float or double). Logit z_ij = a2c_i T_ij + off_i (a2c = alpha^2 c, off = -||x||^2 c plus any
// re-basing). Overwrites S with the weights e^(z - m_new), updates m, l, q, and rescales o (may be null) by
// e^(m_old - m_new) so the caller adds W Y to it. Returns through nonzero_cols (n bytes, may be null) which columns
// have a nonzero weight in some row.
template <typename T>
void denoise_epilogue(T* S, std::int64_t M, std::int64_t n, std::int64_t ldS, const double* a2c, const double* off,
                      double* m, double* l, double* q, double* o, std::int64_t d, std::uint8_t* nonzero_cols);

}  // namespace cpu
}  // namespace diffgen_fast
