// Native CUDA kernels of exact kNN (the "cuda" knn backend; diffgen_fast/ops/knn/native_cuda.py drives them).
//
//   sqdist_tile_kernel   squared distances of a [query block, training chunk] tile as DIRECT DIFFERENCES
//                        (sum_c (x_c - y_c)^2, fma accumulation in T = float or double, stored as float), tiled
//                        like an SGEMM: 64 x 64 outputs per block of 256 threads, 4 x 4 per thread, d in steps of 16
//                        through shared memory. Direct differences keep a small RELATIVE error, which is what the
//                        Python side certifies against (no norm expansion, no cancellation).
//   select_topk_kernel   one block per row: the k smallest entries of the row by (value, column). Radix select on
//                        the order-preserving uint32 key of the float (4 passes of 8-bit histograms in shared
//                        memory) finds the k-th smallest key exactly; an ordered compaction (warp ballots and a
//                        block scan, in column order) gathers every entry below it and the entries equal to it with
//                        the smallest columns; a bitonic sort by (key, column) in shared memory orders them.
//                        Deterministic, exact for fp32 values, ties to the smaller column.
//   sqdist_pairs_kernel  float64 distances of given (row, candidate) pairs, one warp per pair: the re-rank.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels.h"

namespace diffgen_fast {
namespace cuda {
namespace {

constexpr int kBM = 64;  // queries per tile
constexpr int kBN = 64;  // training points per tile
constexpr int kBK = 16;  // dimensions per shared-memory step
constexpr int kTileThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs (strided by 16)
constexpr std::int64_t kMaxGridY = 65535;

std::string error_text(cudaError_t err, const char* where) {
    return std::string(where) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string check_launch(const char* where) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? std::string() : error_text(err, where);
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    sqdist_tile_kernel(const T* __restrict__ x, const T* __restrict__ y, float* __restrict__ out, std::int64_t M,
                       std::int64_t n, std::int64_t d) {
    __shared__ T xs[kBK][kBM + 1];
    __shared__ T ys[kBK][kBN + 1];
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kBM;
    const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kBN;

    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    }

    for (std::int64_t k0 = 0; k0 < d; k0 += kBK) {
        // Out-of-range rows and dimensions load 0: padded dimensions add (0 - 0)^2 = 0, padded rows are not stored.
        for (int e = tid; e < kBM * kBK; e += kTileThreads) {
            const int r = e / kBK;
            const int c = e % kBK;
            const std::int64_t gr = row0 + r;
            const std::int64_t gc = k0 + c;
            xs[c][r] = (gr < M && gc < d) ? x[gr * d + gc] : T(0);
        }
        for (int e = tid; e < kBN * kBK; e += kTileThreads) {
            const int r = e / kBK;
            const int c = e % kBK;
            const std::int64_t gr = col0 + r;
            const std::int64_t gc = k0 + c;
            ys[c][r] = (gr < n && gc < d) ? y[gr * d + gc] : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < kBK; ++c) {
            T xv[4];
            T yv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) xv[i] = xs[c][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) yv[j] = ys[c][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const T diff = xv[i] - yv[j];
                    acc[i][j] = fma(diff, diff, acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const std::int64_t gr = row0 + ty + 16 * i;
        if (gr >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const std::int64_t gc = col0 + tx + 16 * j;
            if (gc < n) out[gr * n + gc] = static_cast<float>(acc[i][j]);
        }
    }
}

template <typename T>
std::string launch_sqdist(const T* x, const T* y, float* out, std::int64_t M, std::int64_t n, std::int64_t d,
                          void* stream) {
    if (M == 0 || n == 0) return std::string();
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    const std::int64_t col_blocks = (n + kBN - 1) / kBN;
    const std::int64_t rows_per_launch = kMaxGridY * kBM;
    for (std::int64_t r0 = 0; r0 < M; r0 += rows_per_launch) {
        const std::int64_t rows = (M - r0 < rows_per_launch) ? (M - r0) : rows_per_launch;
        const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + kBM - 1) / kBM));
        sqdist_tile_kernel<T><<<grid, kTileThreads, 0, s>>>(x + r0 * d, y, out + r0 * n, rows, n, d);
        const std::string err = check_launch("sqdist_tile_kernel");
        if (!err.empty()) return err;
    }
    return std::string();
}

// ---------------------------------------------------------------------------------------------------------------
// Selection

constexpr int kSelThreads = 256;
constexpr int kSelWarps = kSelThreads / 32;

// Order-preserving map of a float to uint32: a < b as floats (no NaN) iff key(a) < key(b).
__device__ __forceinline__ std::uint32_t float_key(float f) {
    const std::uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(std::uint32_t k) {
    const std::uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

__global__ void __launch_bounds__(kSelThreads)
    select_topk_kernel(const float* __restrict__ dist, float* __restrict__ vals, std::int64_t* __restrict__ idx,
                       std::int64_t n, int k, int kpow2) {
    __shared__ std::uint32_t skey[kSelectMaxK];
    __shared__ std::uint32_t scol[kSelectMaxK];
    __shared__ std::uint32_t hist[256];
    __shared__ std::uint32_t warp_less[kSelWarps];
    __shared__ std::uint32_t warp_eq[kSelWarps];
    __shared__ std::uint32_t s_prefix;
    __shared__ std::uint32_t s_remaining;
    __shared__ std::uint32_t s_base_less;
    __shared__ std::uint32_t s_base_eq;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const std::int64_t row = blockIdx.x;
    const float* __restrict__ drow = dist + row * n;

    // 1. Radix select: the k-th smallest key. Invariant: `remaining` (>= 1) is the rank of the wanted key among the
    //    keys whose bits under `mask` equal `prefix`; at least `remaining` such keys exist.
    std::uint32_t prefix = 0;
    std::uint32_t mask = 0;
    std::uint32_t remaining = static_cast<std::uint32_t>(k);
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += kSelThreads) hist[b] = 0;
        __syncthreads();
        for (std::int64_t i = tid; i < n; i += kSelThreads) {
            const std::uint32_t key = float_key(drow[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            std::uint32_t below = 0;
            int b = 0;
            for (; b < 255; ++b) {
                if (below + hist[b] >= remaining) break;
                below += hist[b];
            }
            s_prefix = prefix | (static_cast<std::uint32_t>(b) << shift);
            s_remaining = remaining - below;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 0xffu << shift;
    }
    const std::uint32_t thr = prefix;                                  // the k-th smallest key
    const std::uint32_t n_less = static_cast<std::uint32_t>(k) - remaining;  // keys strictly below it
    const std::uint32_t need_eq = remaining;                           // keys equal to it that are taken

    // 2. Ordered compaction, in column order: all keys < thr, and the first need_eq keys == thr.
    if (tid == 0) {
        s_base_less = 0;
        s_base_eq = 0;
    }
    __syncthreads();
    const std::uint32_t lanes_below = (1u << lane) - 1u;
    for (std::int64_t start = 0; start < n; start += kSelThreads) {
        const std::int64_t i = start + tid;
        const std::uint32_t key = (i < n) ? float_key(drow[i]) : 0xffffffffu;
        const bool less = i < n && key < thr;
        const bool eq = i < n && key == thr;
        const std::uint32_t ballot_less = __ballot_sync(0xffffffffu, less);
        const std::uint32_t ballot_eq = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) {
            warp_less[warp] = __popc(ballot_less);
            warp_eq[warp] = __popc(ballot_eq);
        }
        __syncthreads();
        std::uint32_t off_less = s_base_less + __popc(ballot_less & lanes_below);
        std::uint32_t off_eq = s_base_eq + __popc(ballot_eq & lanes_below);
        std::uint32_t total_less = 0;
        std::uint32_t total_eq = 0;
        for (int w = 0; w < kSelWarps; ++w) {
            if (w < warp) {
                off_less += warp_less[w];
                off_eq += warp_eq[w];
            }
            total_less += warp_less[w];
            total_eq += warp_eq[w];
        }
        if (less) {  // off_less < n_less: there are exactly n_less such keys
            skey[off_less] = key;
            scol[off_less] = static_cast<std::uint32_t>(i);
        }
        if (eq && off_eq < need_eq) {
            skey[n_less + off_eq] = key;
            scol[n_less + off_eq] = static_cast<std::uint32_t>(i);
        }
        __syncthreads();  // every thread has read the bases and the warp counts
        if (tid == 0) {
            s_base_less += total_less;
            s_base_eq += total_eq;
        }
        __syncthreads();
        if (s_base_less >= n_less && s_base_eq >= need_eq) break;  // block-uniform (shared values after a barrier)
    }

    // 3. Pad to a power of two with keys that sort last, then a bitonic sort by (key, column).
    for (int i = k + tid; i < kpow2; i += kSelThreads) {
        skey[i] = 0xffffffffu;
        scol[i] = 0xffffffffu;
    }
    __syncthreads();
    for (int size = 2; size <= kpow2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = tid; t < kpow2 / 2; t += kSelThreads) {
                const int low = t & (stride - 1);
                const int a = 2 * (t - low) + low;
                const int b = a + stride;
                const bool ascending = (a & size) == 0;
                const std::uint32_t ka = skey[a], kb = skey[b];
                const std::uint32_t ca = scol[a], cb = scol[b];
                const bool a_after_b = ka > kb || (ka == kb && ca > cb);
                if (a_after_b == ascending) {
                    skey[a] = kb;
                    skey[b] = ka;
                    scol[a] = cb;
                    scol[b] = ca;
                }
            }
            __syncthreads();
        }
    }

    // 4. Write the row.
    for (int i = tid; i < k; i += kSelThreads) {
        vals[row * k + i] = key_float(skey[i]);
        idx[row * k + i] = static_cast<std::int64_t>(scol[i]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Exact re-rank

constexpr int kPairThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPairThreads)
    sqdist_pairs_kernel(const T* __restrict__ x, const T* __restrict__ y, const std::int64_t* __restrict__ idx,
                        double* __restrict__ out, std::int64_t n, std::int64_t c, std::int64_t d,
                        std::int64_t total) {
    const int lane = threadIdx.x & 31;
    const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (kPairThreads / 32);
    // p is the same for every lane of a warp, so the loop and the shuffles below are warp-uniform.
    for (std::int64_t p = (static_cast<std::int64_t>(blockIdx.x) * kPairThreads + threadIdx.x) / 32; p < total;
         p += warps) {
        const std::int64_t r = p / c;
        const std::int64_t j = idx[p];
        const bool valid = j >= 0 && j < n;
        double acc = 0.0;
        if (valid) {
            for (std::int64_t t = lane; t < d; t += 32) {
                const double diff = static_cast<double>(x[r * d + t]) - static_cast<double>(y[j * d + t]);
                acc = fma(diff, diff, acc);
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) out[p] = valid ? acc : __longlong_as_double(0x7ff8000000000000LL);
    }
}

template <typename T>
std::string launch_pairs(const T* x, const T* y, const std::int64_t* idx, double* out, std::int64_t M,
                         std::int64_t n, std::int64_t c, std::int64_t d, void* stream) {
    const std::int64_t total = M * c;
    if (total == 0) return std::string();
    const std::int64_t warps_per_block = kPairThreads / 32;
    std::int64_t blocks = (total + warps_per_block - 1) / warps_per_block;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    sqdist_pairs_kernel<T><<<static_cast<unsigned>(blocks), kPairThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        x, y, idx, out, n, c, d, total);
    return check_launch("sqdist_pairs_kernel");
}

}  // namespace

std::string launch_sqdist_f32(const float* x, const float* y, float* out, std::int64_t M, std::int64_t n,
                              std::int64_t d, void* stream) {
    return launch_sqdist<float>(x, y, out, M, n, d, stream);
}

std::string launch_sqdist_f64(const double* x, const double* y, float* out, std::int64_t M, std::int64_t n,
                              std::int64_t d, void* stream) {
    return launch_sqdist<double>(x, y, out, M, n, d, stream);
}

std::string launch_select_topk(const float* dist, float* vals, std::int64_t* idx, std::int64_t M, std::int64_t n,
                               int k, void* stream) {
    if (M == 0) return std::string();
    int kpow2 = 1;
    while (kpow2 < k) kpow2 <<= 1;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    const std::int64_t rows_per_launch = std::int64_t(1) << 30;
    for (std::int64_t r0 = 0; r0 < M; r0 += rows_per_launch) {
        const std::int64_t rows = (M - r0 < rows_per_launch) ? (M - r0) : rows_per_launch;
        select_topk_kernel<<<static_cast<unsigned>(rows), kSelThreads, 0, s>>>(dist + r0 * n, vals + r0 * k,
                                                                               idx + r0 * k, n, k, kpow2);
        const std::string err = check_launch("select_topk_kernel");
        if (!err.empty()) return err;
    }
    return std::string();
}

std::string launch_sqdist_pairs_f32(const float* x, const float* y, const std::int64_t* idx, double* out,
                                    std::int64_t M, std::int64_t n, std::int64_t c, std::int64_t d, void* stream) {
    return launch_pairs<float>(x, y, idx, out, M, n, c, d, stream);
}

std::string launch_sqdist_pairs_f64(const double* x, const double* y, const std::int64_t* idx, double* out,
                                    std::int64_t M, std::int64_t n, std::int64_t c, std::int64_t d, void* stream) {
    return launch_pairs<double>(x, y, idx, out, M, n, c, d, stream);
}

}  // namespace cuda
}  // namespace diffgen_fast
