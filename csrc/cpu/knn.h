// Exact k nearest neighbours in squared L2 distance on the CPU (backend="cpu" of diffgen_fast.knn).
//
// Two passes per call:
//   1. Approximate distances in the input precision, register-blocked (a few queries x a panel of training points
//      held transposed, vectorised across the points), each query keeping its kk = k + slack best candidates in a
//      bounded max-heap, so most points are rejected by one compare with the heap's root. Small d (<= 32) uses
//      direct differences; larger d the norm expansion ||x||^2 + ||y||^2 - 2 x.y.
//   2. The candidates' distances recomputed in float64 as differences (sum over the coordinates, in index order),
//      sorted by (distance, index), and certified: every point left out had an approximate distance whose
//      certified error bound puts it strictly above the k-th exact distance. A query that cannot be certified
//      (near-ties beyond the slack) is redone on its own with a doubled slack until it is.
// The result is the exact top-k ordered by (float64 distance, index): ties go to the smaller index, the same rule
// as the torch reference, and it does not depend on the thread count. Plain C++17, no Python or torch headers.
#pragma once

#include <cstdint>

namespace diffgen_fast {
namespace cpu {

// x: [M, d] and y: [n, d] row-major contiguous arrays of T (float or double), finite; 1 <= k <= n, d >= 1.
// Writes out_dist [M, k] (float64 squared distances, ascending) and out_index [M, k] (row of y plus index_offset).
// Work is split over get_num_threads() OpenMP threads (over queries, and over training points when M is small).
template <typename T>
void knn_topk(const T* x, const T* y, std::int64_t M, std::int64_t n, std::int64_t d, std::int64_t k,
              double* out_dist, std::int64_t* out_index, std::int64_t index_offset);

// The first pass float32 data with d > 32 runs on this CPU: "bf16 screen (avx512bf16)" (bf16 dot products with a
// certified bound, then the float64 re-rank; DIFFGEN_FAST_CPU_KERNEL=generic turns it off) or "fp32 panels".
const char* knn_kernel_name();

extern template void knn_topk<float>(const float*, const float*, std::int64_t, std::int64_t, std::int64_t,
                                     std::int64_t, double*, std::int64_t*, std::int64_t);
extern template void knn_topk<double>(const double*, const double*, std::int64_t, std::int64_t, std::int64_t,
                                      std::int64_t, double*, std::int64_t*, std::int64_t);

}  // namespace cpu
}  // namespace diffgen_fast
