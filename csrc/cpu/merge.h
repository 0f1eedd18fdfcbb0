// Exact merge of two softmax states (m, l, q, o), the rule every chunked reduction in diffgen-fast is built on.
//
// A state of a set of logits z_i with values y_i (one row per query):
//   m = max_i z_i (-inf for the empty set), l = sum_i exp(z_i - m), q = sum_i exp(2 (z_i - m)),
//   o = sum_i exp(z_i - m) y_i.
// Merging state 2 into state 1 rescales both to the larger m:
//   m = max(m1, m2); s_a = exp(m1 - m) (0 when m1 = -inf); s_b likewise;
//   l = l1 s_a + l2 s_b;  q = q1 s_a^2 + q2 s_b^2;  o = o1 s_a + o2 s_b.
// The operation order follows diffgen_fast/ops/merge.py so results agree with the torch reference to rounding
// of exp (see tests/test_native.py). Plain C++17, no Python or torch headers.
#pragma once

#include <cstdint>

namespace diffgen_fast {
namespace cpu {

// Merge state 2 into state 1 in place. m, l, q are [M] float64 arrays; o1 and o2 are [M, d] row-major
// contiguous arrays of T (float or double), or both nullptr when the state carries no o (d is then ignored).
// State 1 and state 2 may be the same arrays; partially overlapping arrays are not supported.
// Rows are split over OpenMP threads when the extension was built with OpenMP and the work is large enough;
// each row is computed by one thread in a fixed order, so the result does not depend on the thread count.
template <typename T>
void merge_softmax_states(double* m1, double* l1, double* q1, T* o1, const double* m2, const double* l2,
                          const double* q2, const T* o2, std::int64_t M, std::int64_t d);

extern template void merge_softmax_states<float>(double*, double*, double*, float*, const double*, const double*,
                                                 const double*, const float*, std::int64_t, std::int64_t);
extern template void merge_softmax_states<double>(double*, double*, double*, double*, const double*,
                                                  const double*, const double*, const double*, std::int64_t,
                                                  std::int64_t);

}  // namespace cpu
}  // namespace diffgen_fast
