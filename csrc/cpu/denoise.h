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
// Y (may be null): the chunk in its row layout [n, d]. With it, on a CPU with AVX-512, the AVX-512 kernel runs and
// yT is not read (it may be null); without it the generic kernel reads yT.
void denoise_direct(const float* x, const float* yT, std::int64_t M, std::int64_t n, std::int64_t d, const double* c,
                    const double* alpha, bool exact, double* m, double* l, double* q, double* o,
                    const float* Y = nullptr);
void denoise_direct(const double* x, const double* yT, std::int64_t M, std::int64_t n, std::int64_t d,
                    const double* c, const double* alpha, bool exact, double* m, double* l, double* q, double* o);

// out[r] = sum_k Y[r, k]^2 in float64 (float32 data: exact products, float64 sums); NaN / Inf propagate, so the
// result is also the finiteness check of the rows. Y: contiguous [n, d].
template <typename T>
void row_sqnorms(const T* Y, std::int64_t n, std::int64_t d, double* out);

// Which direct kernel runs for fp32 data on this CPU: "avx512 intrinsics" or the multiversioned clone's ISA
// (DIFFGEN_FAST_CPU_KERNEL=generic forces the latter).
const char* direct_kernel_name();

// True when denoise_direct on float32 data reads the row layout Y (and not yT) on this CPU.
bool direct_reads_rows();

// Epilogue of the GEMM path (large d): S [M, n] holds T_ij = (2 / alpha_i) x_i.y_j - ||y_j||^2 (computed by the
// caller's GEMM, in T = float or double). Logit z_ij = a2c_i T_ij + off_i (a2c = alpha^2 c, off = -||x||^2 c plus any
// re-basing). Overwrites S with the weights e^(z - m_new), updates m, l, q, and rescales o (may be null) by
// e^(m_old - m_new) so the caller adds W Y to it. Returns through nonzero_cols (n bytes, may be null) which columns
// have a nonzero weight in some row.
template <typename T>
void denoise_epilogue(T* S, std::int64_t M, std::int64_t n, std::int64_t ldS, const double* a2c, const double* off,
                      double* m, double* l, double* q, double* o, std::int64_t d, std::uint8_t* nonzero_cols);

// The certified refinement of the GEMM path (csrc/cpu/gemm_path.cpp). T [M, n] (row stride ldT) holds the fp32
// scores T_ij = (2 / alpha_i) x_i.y_j - ||y_j||^2; row i's candidates are the entries T_ij >= lo[i]. A row with at
// most `budget` candidates is refined in place: each candidate's exact score t_j = (||x_i||^2 - ||x_i - alpha_i
// y_j||^2) / alpha_i^2 (float64 differences), then the row is re-based on their max (shift[i]): every entry becomes
// T_ij - shift (in fp32), the candidates t_j - shift. Rows with more candidates (or none) are left untouched with
// shift[i] = 0. count[i]: row i's candidate count. x: [M, d], Y: [n, d], float32, contiguous; alpha, xx
// (= ||x_i||^2): float64 [M]; lo: float32 [M].
void refine_candidates(float* T, std::int64_t M, std::int64_t n, std::int64_t ldT, const float* x, const float* Y,
                       std::int64_t d, const double* alpha, const double* xx, const float* lo, std::int64_t budget,
                       double* shift, std::int64_t* count);

// The sparse output product of the GEMM path: W [M, n] (row stride ldW) holds the epilogue's weights; for every
// row, o[i, :] += sum_j W_ij y_j (float64) over the entries W_ij >= tail_w * max_j W_ij (the rest together weigh
// < n tail_w of the row's largest). Returns the number of entries used, or -1 (o untouched) when it would exceed
// max_nnz. Y: [n, d] float32, o: float64 [M, d], contiguous.
std::int64_t sparse_pv(const float* W, std::int64_t M, std::int64_t n, std::int64_t ldW, const float* Y,
                       std::int64_t d, double* o, double tail_w, std::int64_t max_nnz);

}  // namespace cpu
}  // namespace diffgen_fast
