#include "parallel.h"

#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace diffgen_fast {
namespace cpu {
namespace {

std::atomic<int> g_num_threads{0};  // 0: the OpenMP runtime's default

}  // namespace

bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

int get_num_threads() {
#ifdef _OPENMP
    const int n = g_num_threads.load(std::memory_order_relaxed);
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

void set_num_threads(int n) {
#ifdef _OPENMP
    g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed);
#else
    (void)n;
#endif
}

}  // namespace cpu
}  // namespace diffgen_fast
