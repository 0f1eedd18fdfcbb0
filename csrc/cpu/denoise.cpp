// Native CPU softmax-weighted denoiser: a direct-difference fused kernel for small d and the fused epilogue of the
// GEMM path for large d. See denoise.h for the state both update.
//
// Work is split into items (a block of kQB queries x a range of training points). When there are too few query
// blocks to keep every thread busy, the training points are split into parts with private states, merged at the
// end with the usual rule. Each item is processed by a multiversioned function (AVX-512 / AVX2+FMA / baseline
// chosen at load time); the OpenMP region itself stays in baseline code, since the compiler outlines it before it
// clones functions per target.
#include "cpu/denoise.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/merge.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace diffgen_fast {
namespace cpu {
namespace {

constexpr std::int64_t kQB = 4;    // queries per block: each training row loaded once per block
constexpr std::int64_t kTN = 256;  // training points per tile
constexpr std::int64_t kMinItems = 16;  // split the training points when there are fewer query blocks than this

template <typename T>
struct DirectArgs {
    const T* x;
    const T* yT;
    std::int64_t n, d;
    const double* c;
    const double* alpha;
};

struct StateRef {
    double* m;
    double* l;
    double* q;
    double* o;  // may be null
};

// Per-thread scratch of one item.
template <typename A, typename W>
struct Scratch {
    std::vector<A> dist;
    std::vector<W> z, w;
    std::vector<typename ExpIndex<W>::type> ibuf;
    std::vector<A> xq;  // the query block, transposed [d, kQB]
    std::int64_t nnz[kQB];  // nonzero weights of each query of the block in the current tile
    explicit Scratch(std::int64_t d) : dist(kQB * kTN), z(kTN), w(kQB * kTN), ibuf(kTN), xq(kQB * d), nnz{} {}
};

// Rescale row i's state to the new max m_new: l, q, o are relative to e^m.
DIFFGEN_FAST_INLINE void rebase(const StateRef& s, std::int64_t i, std::int64_t d, double m_new) {
    const double m_old = s.m[i];
    if (m_new == m_old) return;
    const double scale = m_old == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(m_old - m_new);
    s.l[i] *= scale;
    s.q[i] *= scale * scale;
    if (s.o != nullptr) {
        double* o = s.o + i * d;
        for (std::int64_t k = 0; k < d; ++k) o[k] *= scale;
    }
    s.m[i] = m_new;
}

// dist[qi * kTN + j] = ||x_(i0+qi) - alpha y_(t0+j)||^2 for the tile, register-blocked: kJB training points (one
// 512-bit vector) x kQB queries of accumulators stay in registers over the d coordinates, so each training value
// loaded feeds kQB fused multiply-adds. Missing queries of a partial block are computed on zeros and ignored.
template <typename T, typename A>
DIFFGEN_FAST_INLINE void tile_distances(const DirectArgs<T>& a, std::int64_t i0, std::int64_t nq, std::int64_t t0,
                                        std::int64_t tn, A* DIFFGEN_FAST_RESTRICT dist, A* DIFFGEN_FAST_RESTRICT xq) {
    constexpr std::int64_t kJB = 64 / sizeof(A);
    const std::int64_t d = a.d, n = a.n;
    A na[kQB];
    for (std::int64_t qi = 0; qi < kQB; ++qi) {
        na[qi] = qi < nq ? static_cast<A>(-a.alpha[i0 + qi]) : A(0);
        for (std::int64_t k = 0; k < d; ++k) xq[k * kQB + qi] = qi < nq ? static_cast<A>(a.x[(i0 + qi) * d + k]) : A(0);
    }
    std::int64_t jb = 0;
    for (; jb + kJB <= tn; jb += kJB) {
        A acc[kQB][kJB];
        for (std::int64_t qi = 0; qi < kQB; ++qi)
            for (std::int64_t jj = 0; jj < kJB; ++jj) acc[qi][jj] = A(0);
        const T* DIFFGEN_FAST_RESTRICT yb = a.yT + t0 + jb;
        for (std::int64_t k = 0; k < d; ++k) {
            const T* DIFFGEN_FAST_RESTRICT yr = yb + k * n;
            const A* DIFFGEN_FAST_RESTRICT xk = xq + k * kQB;
            for (std::int64_t qi = 0; qi < kQB; ++qi) {
#pragma omp simd
                for (std::int64_t jj = 0; jj < kJB; ++jj) {
                    const A diff = xk[qi] + na[qi] * static_cast<A>(yr[jj]);
                    acc[qi][jj] += diff * diff;
                }
            }
        }
        for (std::int64_t qi = 0; qi < kQB; ++qi)
            for (std::int64_t jj = 0; jj < kJB; ++jj) dist[qi * kTN + jb + jj] = acc[qi][jj];
    }
    if (jb < tn) {  // the last partial vector of the chunk
        for (std::int64_t qi = 0; qi < kQB; ++qi)
            for (std::int64_t j = jb; j < tn; ++j) dist[qi * kTN + j] = A(0);
        for (std::int64_t k = 0; k < d; ++k) {
            const T* DIFFGEN_FAST_RESTRICT yr = a.yT + k * n + t0;
            for (std::int64_t qi = 0; qi < kQB; ++qi) {
                for (std::int64_t j = jb; j < tn; ++j) {
                    const A diff = xq[k * kQB + qi] + na[qi] * static_cast<A>(yr[j]);
                    dist[qi * kTN + j] += diff * diff;
                }
            }
        }
    }
}

// o[qi, k] += sum_j w[qi, j] y_(t0+j),k for the block's queries: a small GEMM, blocked over kKB coordinates and the
// kQB queries so each loaded vector feeds several multiply-adds. w rows are kTN long, zero beyond tn.
template <typename T, typename W>
DIFFGEN_FAST_INLINE void tile_accumulate(const DirectArgs<T>& a, std::int64_t t0, std::int64_t tn,
                                         const W* DIFFGEN_FAST_RESTRICT w, double* DIFFGEN_FAST_RESTRICT o,
                                         std::int64_t nq) {
    constexpr std::int64_t kKB = 4;
    const std::int64_t d = a.d, n = a.n;
    std::int64_t k0 = 0;
    for (; k0 + kKB <= d; k0 += kKB) {
        W acc[kQB][kKB];
        for (std::int64_t qi = 0; qi < kQB; ++qi)
            for (std::int64_t kk = 0; kk < kKB; ++kk) acc[qi][kk] = W(0);
        const T* DIFFGEN_FAST_RESTRICT y0 = a.yT + k0 * n + t0;
        const T* DIFFGEN_FAST_RESTRICT y1 = y0 + n;
        const T* DIFFGEN_FAST_RESTRICT y2 = y1 + n;
        const T* DIFFGEN_FAST_RESTRICT y3 = y2 + n;
        for (std::int64_t qi = 0; qi < kQB; ++qi) {
            const W* DIFFGEN_FAST_RESTRICT wq = w + qi * kTN;
            W s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (std::int64_t j = 0; j < tn; ++j) {
                s0 += wq[j] * static_cast<W>(y0[j]);
                s1 += wq[j] * static_cast<W>(y1[j]);
                s2 += wq[j] * static_cast<W>(y2[j]);
                s3 += wq[j] * static_cast<W>(y3[j]);
            }
            acc[qi][0] = s0;
            acc[qi][1] = s1;
            acc[qi][2] = s2;
            acc[qi][3] = s3;
        }
        for (std::int64_t qi = 0; qi < nq; ++qi)
            for (std::int64_t kk = 0; kk < kKB; ++kk) o[qi * d + k0 + kk] += static_cast<double>(acc[qi][kk]);
    }
    for (; k0 < d; ++k0) {
        const T* DIFFGEN_FAST_RESTRICT yr = a.yT + k0 * n + t0;
        for (std::int64_t qi = 0; qi < nq; ++qi) {
            const W* DIFFGEN_FAST_RESTRICT wq = w + qi * kTN;
            W acc = 0;
#pragma omp simd reduction(+ : acc)
            for (std::int64_t j = 0; j < tn; ++j) acc += wq[j] * static_cast<W>(yr[j]);
            o[qi * d + k0] += static_cast<double>(acc);
        }
    }
}

// Queries [i0, i0 + nq) against training points [j0, j1) of the chunk; A: distance accumulation, W: weights.
template <typename T, typename A, typename W>
DIFFGEN_FAST_INLINE void direct_item(const DirectArgs<T>& a, std::int64_t i0, std::int64_t nq, std::int64_t j0,
                                     std::int64_t j1, const StateRef& s, Scratch<A, W>& sc) {
    const std::int64_t d = a.d;
    A* DIFFGEN_FAST_RESTRICT dist = sc.dist.data();
    W* DIFFGEN_FAST_RESTRICT z = sc.z.data();
    W* DIFFGEN_FAST_RESTRICT w = sc.w.data();
    for (std::int64_t t0 = j0; t0 < j1; t0 += kTN) {
        const std::int64_t tn = std::min(kTN, j1 - t0);
        tile_distances<T, A>(a, i0, nq, t0, tn, dist, sc.xq.data());
        std::int64_t nnz_total = 0;
        bool any = false;
        for (std::int64_t qi = 0; qi < kQB; ++qi) {
            W* DIFFGEN_FAST_RESTRICT wq = w + qi * kTN;
            sc.nnz[qi] = 0;
            if (qi >= nq) {
                std::fill(wq, wq + kTN, W(0));
                continue;
            }
            const std::int64_t i = i0 + qi;
            const A* DIFFGEN_FAST_RESTRICT dq = dist + qi * kTN;
            // the smallest distance of the tile gives its largest logit
            A dmin = std::numeric_limits<A>::infinity();
#pragma omp simd reduction(min : dmin)
            for (std::int64_t j = 0; j < tn; ++j) dmin = dq[j] < dmin ? dq[j] : dmin;
            const double c = a.c[i];
            const double zmax = -static_cast<double>(dmin) * c;
            const double m_new = std::max(s.m[i], zmax);
            if (zmax - m_new < static_cast<double>(exp_cutoff<W>())) {  // every weight of the tile is 0
                std::fill(wq, wq + kTN, W(0));
                continue;
            }
            rebase(s, i, d, m_new);
            // z - m_new = -(dist - dmin) c + (zmax - m_new): the small difference first, then the offset
            const A cc = static_cast<A>(c);
            const A base = static_cast<A>(zmax - m_new);
#pragma omp simd
            for (std::int64_t j = 0; j < tn; ++j) z[j] = static_cast<W>(base - (dq[j] - dmin) * cc);
            exp_nonpositive(z, wq, sc.ibuf.data(), static_cast<long>(tn));
            std::fill(wq + tn, wq + kTN, W(0));
            W lsum = 0, qsum = 0;
            std::int64_t nnz = 0;
#pragma omp simd reduction(+ : lsum, qsum, nnz)
            for (std::int64_t j = 0; j < tn; ++j) {
                lsum += wq[j];
                qsum += wq[j] * wq[j];
                nnz += wq[j] != W(0) ? 1 : 0;
            }
            s.l[i] += static_cast<double>(lsum);
            s.q[i] += static_cast<double>(qsum);
            sc.nnz[qi] = nnz;
            nnz_total += nnz;
            any = true;
        }
        if (s.o == nullptr || !any) continue;
        if (nnz_total * 8 < tn) {  // small sigma: a few weights carry the tile; accumulate only those
            for (std::int64_t qi = 0; qi < nq; ++qi) {
                if (sc.nnz[qi] == 0) continue;
                const W* wq = w + qi * kTN;
                double* DIFFGEN_FAST_RESTRICT o = s.o + (i0 + qi) * d;
                for (std::int64_t j = 0; j < tn; ++j) {
                    if (wq[j] == W(0)) continue;
                    const W wj = wq[j];
                    for (std::int64_t k = 0; k < d; ++k) {
                        o[k] += static_cast<double>(wj * static_cast<W>(a.yT[k * a.n + t0 + j]));
                    }
                }
            }
        } else {
            tile_accumulate<T, W>(a, t0, tn, w, s.o + i0 * d, nq);
        }
    }
}

DIFFGEN_FAST_MULTIVERSION void direct_item_f32_fast(const DirectArgs<float>& a, std::int64_t i0, std::int64_t nq,
                                                    std::int64_t j0, std::int64_t j1, const StateRef& s,
                                                    Scratch<float, float>& sc) {
    direct_item<float, float, float>(a, i0, nq, j0, j1, s, sc);
}

DIFFGEN_FAST_MULTIVERSION void direct_item_f32_exact(const DirectArgs<float>& a, std::int64_t i0, std::int64_t nq,
                                                     std::int64_t j0, std::int64_t j1, const StateRef& s,
                                                     Scratch<double, float>& sc) {
    direct_item<float, double, float>(a, i0, nq, j0, j1, s, sc);
}

DIFFGEN_FAST_MULTIVERSION void direct_item_f64(const DirectArgs<double>& a, std::int64_t i0, std::int64_t nq,
                                               std::int64_t j0, std::int64_t j1, const StateRef& s,
                                               Scratch<double, double>& sc) {
    direct_item<double, double, double>(a, i0, nq, j0, j1, s, sc);
}

template <typename A, typename W, typename T, typename Fn>
void run_direct(const DirectArgs<T>& a, std::int64_t M, StateRef s, Fn item) {
    const std::int64_t d = a.d, n = a.n;
    const int threads = get_num_threads();
    const std::int64_t qblocks = (M + kQB - 1) / kQB;
    const std::int64_t tiles = (n + kTN - 1) / kTN;
    // parts over the training points so that every thread gets work when there are few query blocks
    // (a function of the shapes only, never of the thread count, so every thread count gives identical results)
    std::int64_t parts = 1;
    if (qblocks < kMinItems) parts = std::min(tiles, (kMinItems + qblocks - 1) / qblocks);
    const std::int64_t tiles_per_part = (tiles + parts - 1) / parts;
    parts = (tiles + tiles_per_part - 1) / tiles_per_part;
    // part 0 updates the caller's state; the others start empty and are merged at the end
    std::vector<double> extra_m, extra_l, extra_q, extra_o;
    if (parts > 1) {
        extra_m.assign((parts - 1) * M, -std::numeric_limits<double>::infinity());
        extra_l.assign((parts - 1) * M, 0.0);
        extra_q.assign((parts - 1) * M, 0.0);
        if (s.o != nullptr) extra_o.assign((parts - 1) * M * d, 0.0);
    }
    auto state_of = [&](std::int64_t p) -> StateRef {
        if (p == 0) return s;
        const std::int64_t r = (p - 1) * M;
        return StateRef{extra_m.data() + r, extra_l.data() + r, extra_q.data() + r,
                        s.o != nullptr ? extra_o.data() + r * d : nullptr};
    };
    const std::int64_t items = qblocks * parts;
    const long long work = static_cast<long long>(M) * n * std::max<std::int64_t>(d, 1);
#pragma omp parallel num_threads(threads) if (threads > 1 && work >= kParallelMinWork)
    {
        Scratch<A, W> sc(d);
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t it = 0; it < items; ++it) {
            const std::int64_t p = it % parts, b = it / parts;
            const std::int64_t i0 = b * kQB, nq = std::min(kQB, M - i0);
            const std::int64_t j0 = p * tiles_per_part * kTN, j1 = std::min(n, (p + 1) * tiles_per_part * kTN);
            item(a, i0, nq, j0, j1, state_of(p), sc);
        }
    }
    for (std::int64_t p = 1; p < parts; ++p) {
        const StateRef e = state_of(p);
        merge_softmax_states<double>(s.m, s.l, s.q, s.o, e.m, e.l, e.q, e.o, M, s.o != nullptr ? d : 0);
    }
}

// The epilogue of one row; W is the weight type, equal to T.
template <typename T>
DIFFGEN_FAST_INLINE void epilogue_row(T* DIFFGEN_FAST_RESTRICT row, std::int64_t n, double a2c, double off,
                                      const StateRef& s, std::int64_t i, std::int64_t d, T* DIFFGEN_FAST_RESTRICT zbuf,
                                      typename ExpIndex<T>::type* ibuf, std::uint8_t* DIFFGEN_FAST_RESTRICT flags) {
    T tmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tmax)
    for (std::int64_t j = 0; j < n; ++j) tmax = row[j] > tmax ? row[j] : tmax;
    const double zmax = a2c * static_cast<double>(tmax) + off;
    const double m_new = std::max(s.m[i], zmax);
    if (!(zmax - m_new >= static_cast<double>(exp_cutoff<T>()))) {
        std::fill(row, row + n, T(0));
        return;
    }
    rebase(s, i, d, m_new);
    const T cc = static_cast<T>(a2c);
    const T base = static_cast<T>(zmax - m_new);
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) zbuf[j] = base + (row[j] - tmax) * cc;
    exp_nonpositive(zbuf, row, ibuf, static_cast<long>(n));
    T lsum = 0, qsum = 0;
#pragma omp simd reduction(+ : lsum, qsum)
    for (std::int64_t j = 0; j < n; ++j) {
        lsum += row[j];
        qsum += row[j] * row[j];
    }
    s.l[i] += static_cast<double>(lsum);
    s.q[i] += static_cast<double>(qsum);
    if (flags != nullptr) {
        for (std::int64_t j = 0; j < n; ++j) flags[j] |= static_cast<std::uint8_t>(row[j] != T(0));
    }
}

DIFFGEN_FAST_MULTIVERSION void epilogue_row_f32(float* row, std::int64_t n, double a2c, double off, const StateRef& s,
                                                std::int64_t i, std::int64_t d, float* zbuf, std::int32_t* ibuf,
                                                std::uint8_t* flags) {
    epilogue_row<float>(row, n, a2c, off, s, i, d, zbuf, ibuf, flags);
}

DIFFGEN_FAST_MULTIVERSION void epilogue_row_f64(double* row, std::int64_t n, double a2c, double off,
                                                const StateRef& s, std::int64_t i, std::int64_t d, double* zbuf,
                                                std::int64_t* ibuf, std::uint8_t* flags) {
    epilogue_row<double>(row, n, a2c, off, s, i, d, zbuf, ibuf, flags);
}

inline void epilogue_row_any(float* row, std::int64_t n, double a2c, double off, const StateRef& s, std::int64_t i,
                             std::int64_t d, float* zbuf, std::int32_t* ibuf, std::uint8_t* flags) {
    epilogue_row_f32(row, n, a2c, off, s, i, d, zbuf, ibuf, flags);
}

inline void epilogue_row_any(double* row, std::int64_t n, double a2c, double off, const StateRef& s, std::int64_t i,
                             std::int64_t d, double* zbuf, std::int64_t* ibuf, std::uint8_t* flags) {
    epilogue_row_f64(row, n, a2c, off, s, i, d, zbuf, ibuf, flags);
}

}  // namespace

void denoise_direct(const float* x, const float* yT, std::int64_t M, std::int64_t n, std::int64_t d,
                           const double* c, const double* alpha, bool exact, double* m, double* l, double* q,
                           double* o) {
    const DirectArgs<float> a{x, yT, n, d, c, alpha};
    if (exact) {
        run_direct<double, float>(a, M, StateRef{m, l, q, o}, direct_item_f32_exact);
    } else {
        run_direct<float, float>(a, M, StateRef{m, l, q, o}, direct_item_f32_fast);
    }
}

void denoise_direct(const double* x, const double* yT, std::int64_t M, std::int64_t n, std::int64_t d,
                            const double* c, const double* alpha, bool /*exact*/, double* m, double* l, double* q,
                            double* o) {
    const DirectArgs<double> a{x, yT, n, d, c, alpha};
    run_direct<double, double>(a, M, StateRef{m, l, q, o}, direct_item_f64);
}

template <typename T>
void denoise_epilogue(T* S, std::int64_t M, std::int64_t n, std::int64_t ldS, const double* a2c, const double* off,
                      double* m, double* l, double* q, double* o, std::int64_t d, std::uint8_t* nonzero_cols) {
    const int threads = get_num_threads();
    const StateRef s{m, l, q, o};
    const long long work = static_cast<long long>(M) * n;
    std::vector<std::uint8_t> flags(nonzero_cols != nullptr ? static_cast<std::size_t>(threads) * n : 0, 0);
#pragma omp parallel num_threads(threads) if (threads > 1 && work >= kParallelMinWork)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        std::vector<T> zbuf(n);
        std::vector<typename ExpIndex<T>::type> ibuf(n);
        std::uint8_t* my_flags = nonzero_cols != nullptr ? flags.data() + static_cast<std::size_t>(t) * n : nullptr;
#pragma omp for schedule(dynamic, 4)
        for (std::int64_t i = 0; i < M; ++i) {
            epilogue_row_any(S + i * ldS, n, a2c[i], off[i], s, i, d, zbuf.data(), ibuf.data(), my_flags);
        }
    }
    if (nonzero_cols != nullptr) {
        std::fill(nonzero_cols, nonzero_cols + n, std::uint8_t(0));
        for (int t = 0; t < threads; ++t) {
            const std::uint8_t* f = flags.data() + static_cast<std::size_t>(t) * n;
            for (std::int64_t j = 0; j < n; ++j) nonzero_cols[j] |= f[j];
        }
    }
}

template void denoise_epilogue<float>(float*, std::int64_t, std::int64_t, std::int64_t, const double*, const double*,
                                      double*, double*, double*, double*, std::int64_t, std::uint8_t*);
template void denoise_epilogue<double>(double*, std::int64_t, std::int64_t, std::int64_t, const double*,
                                       const double*, double*, double*, double*, double*, std::int64_t,
                                       std::uint8_t*);

}  // namespace cpu
}  // namespace diffgen_fast
