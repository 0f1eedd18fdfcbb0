// Thread control for the native CPU kernels: a thin layer over OpenMP that degrades to one thread without it.
//
// The thread count is this module's own: kernels pass it in a num_threads clause rather than through
// omp_set_num_threads. The OpenMP runtime (libgomp.so.1) is shared with torch when both are loaded, since the
// loader reuses whichever copy came first, so setting the runtime's global count would change torch's intra-op
// thread count as well.
#pragma once

namespace diffgen_fast {
namespace cpu {

// True when the extension was compiled with OpenMP.
bool openmp_enabled();

// The number of threads the kernels use: the value of set_num_threads, or else the OpenMP runtime's default
// (omp_get_max_threads(), which follows OMP_NUM_THREADS); 1 without OpenMP.
int get_num_threads();

// Set the number of threads for later kernel calls (n >= 1; the caller validates); 0 restores the default.
// No-op without OpenMP.
void set_num_threads(int n);

// Work (M * max(d, 1) elements) below which a kernel runs on the calling thread: a parallel region costs more.
constexpr long long kParallelMinWork = 1 << 15;

}  // namespace cpu
}  // namespace diffgen_fast
