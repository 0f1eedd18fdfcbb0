#include "merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "parallel.h"

namespace diffgen_fast {
namespace cpu {
namespace {

// exp(m_old - m_new), with 0 for an empty state (m_old = -inf) even when m_new is -inf too.
inline double scale(double m_old, double m_new) {
    if (m_old == -std::numeric_limits<double>::infinity()) return 0.0;
    return std::exp(m_old - m_new);
}

template <typename T>
inline void merge_row(double* m1, double* l1, double* q1, T* o1, const double* m2, const double* l2,
                      const double* q2, const T* o2, std::int64_t i, std::int64_t d) {
    const double a = m1[i];
    const double b = m2[i];
    // torch.maximum: a NaN in either operand gives NaN.
    const double m = (a > b || a != a) ? a : b;
    const double sa = scale(a, m);
    const double sb = scale(b, m);
    m1[i] = m;
    l1[i] = l1[i] * sa + l2[i] * sb;
    q1[i] = q1[i] * sa * sa + q2[i] * sb * sb;
    if (o1 != nullptr) {
        // The reference casts the scales to the accumulation dtype first, then multiplies in that dtype.
        const T ta = static_cast<T>(sa);
        const T tb = static_cast<T>(sb);
        T* r1 = o1 + i * d;
        const T* r2 = o2 + i * d;
        for (std::int64_t j = 0; j < d; ++j) {
            const T x = r1[j] * ta;
            const T y = r2[j] * tb;
            r1[j] = x + y;
        }
    }
}

}  // namespace

template <typename T>
void merge_softmax_states(double* m1, double* l1, double* q1, T* o1, const double* m2, const double* l2,
                          const double* q2, const T* o2, std::int64_t M, std::int64_t d) {
    if (M <= 0) return;
    if (o1 == nullptr || o2 == nullptr) {
        o1 = nullptr;
        o2 = nullptr;
        d = 0;
    }
#ifdef _OPENMP
    const long long work = static_cast<long long>(M) * std::max<long long>(d, 1);
    const int threads = get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && work >= kParallelMinWork)
#endif
    for (std::int64_t i = 0; i < M; ++i) {
        merge_row<T>(m1, l1, q1, o1, m2, l2, q2, o2, i, d);
    }
}

template void merge_softmax_states<float>(double*, double*, double*, float*, const double*, const double*,
                                          const double*, const float*, std::int64_t, std::int64_t);
template void merge_softmax_states<double>(double*, double*, double*, double*, const double*, const double*,
                                           const double*, const double*, std::int64_t, std::int64_t);

}  // namespace cpu
}  // namespace diffgen_fast
