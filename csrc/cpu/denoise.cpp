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
#include <cstdlib>
#include <string>
#include <type_traits>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/merge.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

#if DIFFGEN_FAST_HAS_MULTIVERSION
// ---- The AVX-512 direct kernel (fp32 data), written with intrinsics --------------------------------------------------
// The auto-vectorised kernel above keeps kQB x 1 vector accumulators and converts each training value per query; this
// one keeps kQB8 queries x 2 vectors of accumulators in registers (16 zmm), loads each training vector once per
// coordinate for the kQB8 queries, and has its own vector exp (vscalefps) and a row-layout P Y that skips the
// training points whose weights are all zero in the block. Same arithmetic as the generic kernel: x - alpha y by one
// fused multiply-add in the accumulation type (float64 for "exact", fp32 for "fast"), squares summed in that type,
// fp32 weights, per-tile sums in float64. Chosen at run time when the CPU has AVX-512F and AVX-512DQ.
// GCC 12's intrinsics headers trip -Wmaybe-uninitialized on _mm512_setzero / undefined (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define DIFFGEN_FAST_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

constexpr std::int64_t kQB8 = 8;     // queries per block of the AVX-512 kernel
constexpr std::int64_t kG = 4;       // blocks per item (they share each tile while it is in L2)
constexpr std::int64_t kPanel = 32;  // training points per packed panel (kTN is a multiple)
constexpr double kExpansionTol = 2.5e-8;  // REFINE_TOL / 4 (diffgen_fast/ops/refine.py)
constexpr double kScreenTail = 50.0;      // TAIL_NATS (diffgen_fast/ops/refine.py): the screen's window in nats
constexpr std::int64_t kScreenFrac = 8;   // the screen keeps a tile when at most 1 / kScreenFrac of its pairs pass

struct Scratch8 {
    std::vector<double> xd;   // [kG][d][kQB8] the blocks' queries (float64, exact)
    std::vector<float> xf;    // [kG][d][kQB8] the same in fp32 (fast)
    std::vector<double> dd;   // [kQB8][kTN + 32] distances (exact)
    std::vector<float> df;    // [kQB8][kTN + 32] distances (fast)
    std::vector<float> w;     // [kQB8][kTN + 32] weights, zero beyond tn
    double xx[kG * kQB8];     // ||x||^2 of the blocks' queries (float64)
    std::int64_t nnz[kQB8];
    std::vector<std::int32_t> cidx;  // [kQB8][kTN + 16] the screen's candidates of each query row
    std::vector<double> cd;          // [kTN] their float64 distances
    std::vector<float> cz;           // [kTN + 16] their logits, then weights
    explicit Scratch8(std::int64_t d)
        : xd(kG * kQB8 * d), xf(kG * kQB8 * d), dd(kQB8 * (kTN + 32)), df(kQB8 * (kTN + 32)), w(kQB8 * (kTN + 32)), xx{},
          nnz{}, cidx(kQB8 * (kTN + 16)), cd(kTN), cz(kTN + 16) {}
};
constexpr std::int64_t kLD = kTN + 32;  // row stride of the scratch tiles

DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE __m512 exp512(__m512 v) {
    // e^v for v <= 0 (rel. error < 2e-7 on [-87, 0]); v < -87 gives 0 (the caller's cutoff), like exp_nonpositive
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 under = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
    v = _mm512_max_ps(v, lo);
    const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693145751953125f), v);
    r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), p, nf);
}

DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE __mmask16 tail_mask16(std::int64_t rem) {
    return rem >= 16 ? static_cast<__mmask16>(0xFFFF) : rem <= 0 ? static_cast<__mmask16>(0)
                                                                  : static_cast<__mmask16>((1u << rem) - 1u);
}

// dist[q * kLD + j] = ||x_q - alpha_q y_(t0+j)||^2 in float64 for the block's kQB8 queries (padding queries are 0).
// pk: the chunk packed in panels of kPanel points, [n / kPanel][d][kPanel] (zero-padded), so each coordinate's
// vector is the next 64 bytes; t0 is a multiple of kPanel.
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void dist_tile_f64(const double* DIFFGEN_FAST_RESTRICT xq,
                                                           const double* na_, const float* DIFFGEN_FAST_RESTRICT pk,
                                                           std::int64_t d, std::int64_t t0, std::int64_t tn,
                                                           double* DIFFGEN_FAST_RESTRICT dist) {
    __m512d na[kQB8];
    for (int q = 0; q < kQB8; ++q) na[q] = _mm512_set1_pd(na_[q]);
    for (std::int64_t jb = 0; jb < tn; jb += 16) {
        __m512d acc[kQB8][2];
        for (int q = 0; q < kQB8; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_pd();
        const float* yp = pk + ((t0 + jb) / kPanel) * d * kPanel + (t0 + jb) % kPanel;
        for (std::int64_t k = 0; k < d; ++k) {
            const __m512 yv = _mm512_loadu_ps(yp + k * kPanel);
            const __m512d y0 = _mm512_cvtps_pd(_mm512_castps512_ps256(yv));
            const __m512d y1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(yv, 1));
            const double* xk = xq + k * kQB8;
            for (int q = 0; q < kQB8; ++q) {
                const __m512d xb = _mm512_set1_pd(xk[q]);
                const __m512d d0 = _mm512_fmadd_pd(na[q], y0, xb);
                const __m512d d1 = _mm512_fmadd_pd(na[q], y1, xb);
                acc[q][0] = _mm512_fmadd_pd(d0, d0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_pd(d1, d1, acc[q][1]);
            }
        }
        for (int q = 0; q < kQB8; ++q) {
            _mm512_storeu_pd(dist + q * kLD + jb, acc[q][0]);
            _mm512_storeu_pd(dist + q * kLD + jb + 8, acc[q][1]);
        }
    }
}

// The float64 norm expansion ||x||^2 - 2 alpha x.y + alpha^2 ||y||^2 (fp32 products are exact in float64, so only
// the float64 sums round): half the work of the differences, used for a block whose rows all certify it
// (expansion_ok). yy: float64 ||y||^2 of the chunk, padded to the panels.
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void dist_tile_f64x(const double* DIFFGEN_FAST_RESTRICT xq,
                                                            const double* xx, const double* na_,
                                                            const float* DIFFGEN_FAST_RESTRICT pk,
                                                            const double* DIFFGEN_FAST_RESTRICT yy, std::int64_t d,
                                                            std::int64_t t0, std::int64_t tn,
                                                            double* DIFFGEN_FAST_RESTRICT dist) {
    for (std::int64_t jb = 0; jb < tn; jb += 16) {
        __m512d acc[kQB8][2];
        for (int q = 0; q < kQB8; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_pd();
        const float* yp = pk + ((t0 + jb) / kPanel) * d * kPanel + (t0 + jb) % kPanel;
        for (std::int64_t k = 0; k < d; ++k) {
            const __m512 yv = _mm512_loadu_ps(yp + k * kPanel);
            const __m512d y0 = _mm512_cvtps_pd(_mm512_castps512_ps256(yv));
            const __m512d y1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(yv, 1));
            const double* xk = xq + k * kQB8;
            for (int q = 0; q < kQB8; ++q) {
                const __m512d xb = _mm512_set1_pd(xk[q]);
                acc[q][0] = _mm512_fmadd_pd(xb, y0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_pd(xb, y1, acc[q][1]);
            }
        }
        const __m512d yy0 = _mm512_loadu_pd(yy + t0 + jb), yy1 = _mm512_loadu_pd(yy + t0 + jb + 8);
        const __m512d zero = _mm512_setzero_pd();
        for (int q = 0; q < kQB8; ++q) {
            const double al = -na_[q];
            const __m512d x2 = _mm512_set1_pd(xx[q]), m2a = _mm512_set1_pd(-2.0 * al), a2 = _mm512_set1_pd(al * al);
            _mm512_storeu_pd(dist + q * kLD + jb,
                             _mm512_max_pd(_mm512_fmadd_pd(a2, yy0, _mm512_fmadd_pd(m2a, acc[q][0], x2)), zero));
            _mm512_storeu_pd(dist + q * kLD + jb + 8,
                             _mm512_max_pd(_mm512_fmadd_pd(a2, yy1, _mm512_fmadd_pd(m2a, acc[q][1], x2)), zero));
        }
    }
}

// The same in fp32 (precision "fast"), one panel of 32 training points per register block.
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void dist_tile_f32(const float* DIFFGEN_FAST_RESTRICT xq, const double* na_,
                                                           const float* DIFFGEN_FAST_RESTRICT pk, std::int64_t d,
                                                           std::int64_t t0, std::int64_t tn,
                                                           float* DIFFGEN_FAST_RESTRICT dist) {
    __m512 na[kQB8];
    for (int q = 0; q < kQB8; ++q) na[q] = _mm512_set1_ps(static_cast<float>(na_[q]));
    for (std::int64_t jb = 0; jb < tn; jb += kPanel) {
        __m512 acc[kQB8][2];
        for (int q = 0; q < kQB8; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
        const float* yp = pk + ((t0 + jb) / kPanel) * d * kPanel;
        for (std::int64_t k = 0; k < d; ++k) {
            const __m512 y0 = _mm512_loadu_ps(yp + k * kPanel);
            const __m512 y1 = _mm512_loadu_ps(yp + k * kPanel + 16);
            const float* xk = xq + k * kQB8;
            for (int q = 0; q < kQB8; ++q) {
                const __m512 xb = _mm512_set1_ps(xk[q]);
                const __m512 d0 = _mm512_fmadd_ps(na[q], y0, xb);
                const __m512 d1 = _mm512_fmadd_ps(na[q], y1, xb);
                acc[q][0] = _mm512_fmadd_ps(d0, d0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_ps(d1, d1, acc[q][1]);
            }
        }
        for (int q = 0; q < kQB8; ++q) {
            _mm512_storeu_ps(dist + q * kLD + jb, acc[q][0]);
            _mm512_storeu_ps(dist + q * kLD + jb + 16, acc[q][1]);
        }
    }
}

// The screen's fp32 norm expansion ||x||^2 - 2 alpha x.y + alpha^2 ||y||^2 for the block's kQB8 queries, one panel of
// 32 points per register block (one multiply-add per pair and coordinate). Its error is bounded by screen_err.
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void dist_tile_f32x(const float* DIFFGEN_FAST_RESTRICT xq, const double* xx,
                                                            const double* na_, const float* DIFFGEN_FAST_RESTRICT pk,
                                                            const float* DIFFGEN_FAST_RESTRICT yyf, std::int64_t d,
                                                            std::int64_t t0, std::int64_t tn,
                                                            float* DIFFGEN_FAST_RESTRICT dist,
                                                            float* DIFFGEN_FAST_RESTRICT rowmin) {
    alignas(64) float vmin[kQB8][16];
    for (int q = 0; q < kQB8; ++q) _mm512_store_ps(vmin[q], _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    for (std::int64_t jb = 0; jb < tn; jb += kPanel) {
        __m512 acc[kQB8][2];
        for (int q = 0; q < kQB8; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
        const float* yp = pk + ((t0 + jb) / kPanel) * d * kPanel;
        const __mmask16 m0 = tail_mask16(tn - jb), m1 = tail_mask16(tn - jb - 16);
        for (std::int64_t k = 0; k < d; ++k) {
            const __m512 y0 = _mm512_loadu_ps(yp + k * kPanel);
            const __m512 y1 = _mm512_loadu_ps(yp + k * kPanel + 16);
            const float* xk = xq + k * kQB8;
            for (int q = 0; q < kQB8; ++q) {
                const __m512 xb = _mm512_set1_ps(xk[q]);
                acc[q][0] = _mm512_fmadd_ps(xb, y0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_ps(xb, y1, acc[q][1]);
            }
        }
        const __m512 yy0 = _mm512_loadu_ps(yyf + t0 + jb), yy1 = _mm512_loadu_ps(yyf + t0 + jb + 16);
        const __m512 zero = _mm512_setzero_ps();
        for (int q = 0; q < kQB8; ++q) {
            const double al = -na_[q];
            const __m512 x2 = _mm512_set1_ps(static_cast<float>(xx[q]));
            const __m512 m2a = _mm512_set1_ps(static_cast<float>(-2.0 * al));
            const __m512 a2 = _mm512_set1_ps(static_cast<float>(al * al));
            const __m512 d0 = _mm512_max_ps(_mm512_fmadd_ps(a2, yy0, _mm512_fmadd_ps(m2a, acc[q][0], x2)), zero);
            const __m512 d1 = _mm512_max_ps(_mm512_fmadd_ps(a2, yy1, _mm512_fmadd_ps(m2a, acc[q][1], x2)), zero);
            _mm512_storeu_ps(dist + q * kLD + jb, d0);
            _mm512_storeu_ps(dist + q * kLD + jb + 16, d1);
            __m512 mn = _mm512_load_ps(vmin[q]);
            mn = _mm512_mask_min_ps(mn, m0, mn, d0);  // padding points (past tn) never count
            mn = _mm512_mask_min_ps(mn, m1, mn, d1);
            _mm512_store_ps(vmin[q], mn);
        }
    }
    for (int q = 0; q < kQB8; ++q) rowmin[q] = _mm512_reduce_min_ps(_mm512_load_ps(vmin[q]));
}

// Pack the chunk Y [n, d] (row layout) into panels [ceil(n / kPanel)][d][kPanel], zero-padded.
void pack_panels(const float* Y, std::int64_t n, std::int64_t d, float* pk) {
    const std::int64_t panels = (n + kPanel - 1) / kPanel;
    const int threads = get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * d >= (1 << 20))
    for (std::int64_t p = 0; p < panels; ++p) {
        const std::int64_t j0 = p * kPanel, jn = std::min(kPanel, n - j0);
        float* out = pk + p * d * kPanel;
        for (std::int64_t j = 0; j < kPanel; ++j) {
            const float* src = Y + (j0 + j) * d;
            for (std::int64_t k = 0; k < d; ++k) out[k * kPanel + j] = j < jn ? src[k] : 0.0f;
        }
    }
}

DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE double row_min(const double* dq, std::int64_t tn) {
    __m512d mn = _mm512_set1_pd(std::numeric_limits<double>::infinity());
    for (std::int64_t j = 0; j < tn; j += 8) {
        const __mmask8 m = static_cast<__mmask8>(tn - j >= 8 ? 0xFF : (1u << (tn - j)) - 1u);
        mn = _mm512_mask_min_pd(mn, m, mn, _mm512_maskz_loadu_pd(m, dq + j));
    }
    return _mm512_reduce_min_pd(mn);
}

DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE float row_min(const float* dq, std::int64_t tn) {
    __m512 mn = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (std::int64_t j = 0; j < tn; j += 16) {
        const __mmask16 m = tail_mask16(tn - j);
        mn = _mm512_mask_min_ps(mn, m, mn, _mm512_maskz_loadu_ps(m, dq + j));
    }
    return _mm512_reduce_min_ps(mn);
}

// Weights of one query row of the tile: w = e^(base - (dist - dmin) c) (0 beyond tn), returns (sum w, sum w^2, nnz)
template <typename A>
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void weights_row(const A* DIFFGEN_FAST_RESTRICT dq, std::int64_t tn, A dmin,
                                                         A cc, A base, float* DIFFGEN_FAST_RESTRICT wq, double* lsum,
                                                         double* qsum, std::int64_t* nnz) {
    __m512 ls = _mm512_setzero_ps(), qs = _mm512_setzero_ps();
    std::int64_t nz = 0;
    for (std::int64_t j = 0; j < tn; j += 16) {
        const __mmask16 m = tail_mask16(tn - j);
        __m512 z;
        if constexpr (sizeof(A) == 8) {
            const __m512d b = _mm512_set1_pd(base), dm = _mm512_set1_pd(dmin), c = _mm512_set1_pd(cc);
            const __m512d z0 = _mm512_fnmadd_pd(_mm512_sub_pd(_mm512_loadu_pd(dq + j), dm), c, b);
            const __m512d z1 = _mm512_fnmadd_pd(_mm512_sub_pd(_mm512_loadu_pd(dq + j + 8), dm), c, b);
            z = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(z0)), _mm512_cvtpd_ps(z1), 1);
        } else {
            z = _mm512_fnmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(dq + j), _mm512_set1_ps(dmin)), _mm512_set1_ps(cc),
                                 _mm512_set1_ps(base));
        }
        const __m512 e = _mm512_maskz_mov_ps(m, exp512(z));
        _mm512_storeu_ps(wq + j, e);
        ls = _mm512_add_ps(ls, e);
        qs = _mm512_fmadd_ps(e, e, qs);
        nz += __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_OQ)));
    }
    *lsum = static_cast<double>(_mm512_reduce_add_ps(ls));
    *qsum = static_cast<double>(_mm512_reduce_add_ps(qs));
    *nnz = nz;
}

// o[q, :] += sum_j w[q, j] Y[t0 + j, :] for 4 queries at a time, Y in its row layout [n, d] (NV vectors of 16 per
// row, the last masked); points whose 4 weights are all zero are skipped.
template <int NV, bool Sparse>
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void accumulate_rows(const float* DIFFGEN_FAST_RESTRICT Y, std::int64_t d,
                                                             std::int64_t t0, std::int64_t tn,
                                                             const float* DIFFGEN_FAST_RESTRICT w, double* o,
                                                             std::int64_t nq) {
    const __mmask16 last = tail_mask16(d - 16 * (NV - 1));
    for (std::int64_t q0 = 0; q0 < nq; q0 += 4) {
        __m512 acc[4][NV];
        for (int q = 0; q < 4; ++q)
            for (int v = 0; v < NV; ++v) acc[q][v] = _mm512_setzero_ps();
        const float* w0 = w + q0 * kLD;
        for (std::int64_t j = 0; j < tn; ++j) {
            if constexpr (Sparse) {  // skip the points whose 4 weights are all zero
                if (w0[j] == 0.0f && w0[kLD + j] == 0.0f && w0[2 * kLD + j] == 0.0f && w0[3 * kLD + j] == 0.0f)
                    continue;
            }
            const float* yr = Y + (t0 + j) * d;
            __m512 yv[NV];
            for (int v = 0; v < NV; ++v)
                yv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, yr + 16 * v) : _mm512_loadu_ps(yr + 16 * v);
            const __m512 b0 = _mm512_set1_ps(w0[j]), b1 = _mm512_set1_ps(w0[kLD + j]),
                         b2 = _mm512_set1_ps(w0[2 * kLD + j]), b3 = _mm512_set1_ps(w0[3 * kLD + j]);
            for (int v = 0; v < NV; ++v) {
                acc[0][v] = _mm512_fmadd_ps(b0, yv[v], acc[0][v]);
                acc[1][v] = _mm512_fmadd_ps(b1, yv[v], acc[1][v]);
                acc[2][v] = _mm512_fmadd_ps(b2, yv[v], acc[2][v]);
                acc[3][v] = _mm512_fmadd_ps(b3, yv[v], acc[3][v]);
            }
        }
        alignas(64) float tmp[4][16 * NV];  // constant indices only, so acc stays in registers
        for (int q = 0; q < 4; ++q)
            for (int v = 0; v < NV; ++v) _mm512_store_ps(&tmp[q][16 * v], acc[q][v]);
        for (std::int64_t q = 0; q < 4 && q0 + q < nq; ++q) {
            double* oq = o + (q0 + q) * d;
            for (std::int64_t k = 0; k < d; ++k) oq[k] += static_cast<double>(tmp[q][k]);
        }
    }
}

// The softmax part of one block and tile: per query the tile's min distance, the state re-based, the weights (into
// w, rows of kLD) and their sums; then O += W Y for the block.
template <typename A>
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE void tile_softmax(const DirectArgs<float>& a, const float* Y, const float* pk,
                                                          const StateRef& s, std::int64_t i0, std::int64_t nq,
                                                          std::int64_t t0, std::int64_t tn, const A* dist, float* w,
                                                          Scratch8& sc) {
    const std::int64_t d = a.d;
    std::int64_t nnz_total = 0;
    for (std::int64_t q = 0; q < kQB8; ++q) {
        float* wq = w + q * kLD;
        sc.nnz[q] = 0;
        if (q >= nq) {
            std::fill(wq, wq + kTN, 0.0f);
            continue;
        }
        const std::int64_t i = i0 + q;
        const A* dq = dist + q * kLD;
        const A dmin = row_min(dq, tn);
        const double c = a.c[i];
        const double zmax = -static_cast<double>(dmin) * c;
        const double m_new = std::max(s.m[i], zmax);
        if (zmax - m_new < static_cast<double>(exp_cutoff<float>())) {
            std::fill(wq, wq + kTN, 0.0f);
            continue;
        }
        rebase(s, i, d, m_new);
        double lsum, qsum;
        weights_row<A>(dq, tn, dmin, static_cast<A>(c), static_cast<A>(zmax - m_new), wq, &lsum, &qsum,
                       &sc.nnz[q]);
        std::fill(wq + tn, wq + kTN, 0.0f);
        s.l[i] += lsum;
        s.q[i] += qsum;
        nnz_total += sc.nnz[q];
    }
    if (s.o == nullptr || nnz_total == 0) return;
    double* o = s.o + i0 * d;
    if (d >= 16) {
        const bool sparse = nnz_total * 4 < tn * nq;
        switch ((d + 15) / 16 + (sparse ? 4 : 0)) {
            case 1: accumulate_rows<1, false>(Y, d, t0, tn, w, o, nq); break;
            case 2: accumulate_rows<2, false>(Y, d, t0, tn, w, o, nq); break;
            case 3: accumulate_rows<3, false>(Y, d, t0, tn, w, o, nq); break;
            case 4: accumulate_rows<4, false>(Y, d, t0, tn, w, o, nq); break;
            case 5: accumulate_rows<1, true>(Y, d, t0, tn, w, o, nq); break;
            case 6: accumulate_rows<2, true>(Y, d, t0, tn, w, o, nq); break;
            case 7: accumulate_rows<3, true>(Y, d, t0, tn, w, o, nq); break;
            default: accumulate_rows<4, true>(Y, d, t0, tn, w, o, nq); break;
        }
    } else if (nnz_total * 8 < tn) {  // small sigma: a few weights carry the tile
        for (std::int64_t q = 0; q < nq; ++q) {
            if (sc.nnz[q] == 0) continue;
            const float* wq = w + q * kLD;
            double* oq = o + q * d;
            for (std::int64_t j = 0; j < tn; ++j) {
                if (wq[j] == 0.0f) continue;
                for (std::int64_t k = 0; k < d; ++k) oq[k] += static_cast<double>(wq[j] * Y[(t0 + j) * d + k]);
            }
        }
    } else {
        // small d: dots over the tile per coordinate, from the panels (the weights are 0 beyond tn)
        for (std::int64_t k = 0; k < d; ++k) {
            for (std::int64_t q = 0; q < nq; ++q) {
                const float* wq = w + q * kLD;
                __m512 acc = _mm512_setzero_ps();
                for (std::int64_t j = 0; j < tn; j += kPanel) {
                    const float* yp = pk + ((t0 + j) / kPanel) * d * kPanel + k * kPanel;
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(wq + j), _mm512_loadu_ps(yp), acc);
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(wq + j + 16), _mm512_loadu_ps(yp + 16), acc);
                }
                o[q * d + k] += static_cast<double>(_mm512_reduce_add_ps(acc));
            }
        }
    }
}

// The screen of one block and tile ("exact" / "auto" at small sigma). dist: the fp32 expansion (dist_tile_f32x),
// off from the true squared distance by at most err[q]. A point can carry more than e^-kScreenTail of the best
// weight so far only if its true distance is within kScreenTail / c of the best true distance so far, so only the
// points with dist <= min(tile's min dist, best so far) + kScreenTail / c + 2 err (the candidates) can: they get
// float64 difference distances, their weights update the state, every other point counts as weight 0 (together
// < n e^-kScreenTail of the top weight, the GEMM path's rule). Returns false, touching nothing, when more than
// 1 / kScreenFrac of the tile's pairs are candidates (then the caller runs the full float64 tile).
DIFFGEN_FAST_AVX512 DIFFGEN_FAST_INLINE bool screen_tile(const DirectArgs<float>& a, const float* Y,
                                                         const StateRef& s, std::int64_t i0, std::int64_t nq,
                                                         std::int64_t t0, std::int64_t tn, const float* dist,
                                                         const float* rowmin, const double* err, const double* xd,
                                                         const double* na_, Scratch8& sc) {
    const std::int64_t d = a.d;
    std::int64_t ncand[kQB8];
    std::int64_t total = 0;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (std::int64_t q = 0; q < nq; ++q) {  // one pass per row: the threshold, then the candidates' indices
        const std::int64_t i = i0 + q;
        const double c = a.c[i];
        const double dbest = s.m[i] == -std::numeric_limits<double>::infinity() ? std::numeric_limits<double>::infinity()
                                                                               : -s.m[i] / c;
        const double t = std::min(static_cast<double>(rowmin[q]), dbest) + kScreenTail / c + 2.0 * err[q];
        float tf = static_cast<float>(t);
        if (static_cast<double>(tf) < t) tf = std::nextafter(tf, std::numeric_limits<float>::infinity());
        const __m512 tv = _mm512_set1_ps(tf);
        const float* dq = dist + q * kLD;
        std::int32_t* ci = sc.cidx.data() + q * (kTN + 16);
        std::int64_t nc = 0;
        for (std::int64_t j = 0; j < tn; j += 16) {
            const __mmask16 m = _mm512_mask_cmp_ps_mask(tail_mask16(tn - j), _mm512_loadu_ps(dq + j), tv, _CMP_LE_OQ);
            _mm512_mask_compressstoreu_epi32(ci + nc, m, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j))));
            nc += __builtin_popcount(static_cast<unsigned>(m));
        }
        ncand[q] = nc;
        total += nc;
        if (total * kScreenFrac > tn * nq) return false;
    }
    for (std::int64_t q = 0; q < nq; ++q) {
        const std::int64_t i = i0 + q;
        const std::int32_t* ci = sc.cidx.data() + q * (kTN + 16);
        const std::int64_t nc = ncand[q];
        if (nc == 0) continue;
        // float64 differences x - alpha y of the candidates, their minimum, the state re-based on it
        const double al = -na_[q];
        double dmin = std::numeric_limits<double>::infinity();
        for (std::int64_t r = 0; r < nc; ++r) {
            const float* yr = Y + (t0 + ci[r]) * d;
            double acc = 0.0;
            for (std::int64_t k = 0; k < d; ++k) {
                const double t = xd[k * kQB8 + q] - al * static_cast<double>(yr[k]);
                acc += t * t;
            }
            sc.cd[r] = acc;
            dmin = std::min(dmin, acc);
        }
        const double c = a.c[i];
        const double zmax = -dmin * c;
        const double m_new = std::max(s.m[i], zmax);
        if (zmax - m_new < static_cast<double>(exp_cutoff<float>())) continue;
        rebase(s, i, d, m_new);
        const double base = zmax - m_new;
        float* cz = sc.cz.data();
        for (std::int64_t r = 0; r < nc; ++r) cz[r] = static_cast<float>(base - (sc.cd[r] - dmin) * c);
        __m512 ls = _mm512_setzero_ps(), qs = _mm512_setzero_ps();
        for (std::int64_t r = 0; r < nc; r += 16) {
            const __mmask16 m = tail_mask16(nc - r);
            const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_maskz_loadu_ps(m, cz + r)));
            _mm512_mask_storeu_ps(cz + r, m, e);
            ls = _mm512_add_ps(ls, e);
            qs = _mm512_fmadd_ps(e, e, qs);
        }
        s.l[i] += static_cast<double>(_mm512_reduce_add_ps(ls));
        s.q[i] += static_cast<double>(_mm512_reduce_add_ps(qs));
        if (s.o != nullptr) {
            double* o = s.o + i * d;
            for (std::int64_t r = 0; r < nc; ++r) {
                const double wr = static_cast<double>(cz[r]);
                if (wr == 0.0) continue;
                const float* yr = Y + (t0 + ci[r]) * d;
                for (std::int64_t k = 0; k < d; ++k) o[k] += wr * static_cast<double>(yr[k]);
            }
        }
    }
    return true;
}

// One item of the AVX-512 kernel: queries [i0, i0 + nq) (nq <= kG * kQB8) against training points [j0, j1), in
// blocks of kQB8 queries; every block runs over one tile of kTN points before the next tile, so the tile's panels
// and rows are read from L2 by the kG blocks. Y: the chunk in row layout [n, d] (for P Y at d >= 16), pk: panels.
template <bool Exact>
DIFFGEN_FAST_AVX512 void direct_item_avx512(const DirectArgs<float>& a, const float* Y, const float* pk,
                                            const double* yy, const float* yyf, double ymax, std::int64_t i0,
                                            std::int64_t nq,
                                            std::int64_t j0, std::int64_t j1, const StateRef& s, Scratch8& sc) {
    using A = typename std::conditional<Exact, double, float>::type;
    const std::int64_t d = a.d;
    const std::int64_t nb = (nq + kQB8 - 1) / kQB8;
    double na[kG][kQB8];
    bool expand[kG];
    bool screen[kG];         // try the screen on this block's tiles (off after a tile where it did not pay)
    double serr[kG][kQB8];   // the screen's error bound per query (squared-distance units)
    // the expansion is certified for a block when every row's float64 rounding error, at most
    // (d + 4) 2^-53 (|x| + alpha max|y|)^2, costs at most REFINE_TOL / 4 nats: c times that <= kExpansionTol
    for (std::int64_t b = 0; b < nb; ++b) {
        const std::int64_t ib = i0 + b * kQB8, nqb = std::min(kQB8, nq - b * kQB8);
        double* xd = sc.xd.data() + b * kQB8 * d;
        float* xf = sc.xf.data() + b * kQB8 * d;
        expand[b] = Exact;
        screen[b] = Exact && yyf != nullptr;
        for (std::int64_t q = 0; q < kQB8; ++q) {
            na[b][q] = q < nqb ? -a.alpha[ib + q] : 0.0;
            double xx = 0.0;
            for (std::int64_t k = 0; k < d; ++k) {
                const float v = q < nqb ? a.x[(ib + q) * d + k] : 0.0f;
                xd[k * kQB8 + q] = v;
                xf[k * kQB8 + q] = v;
                xx += static_cast<double>(v) * static_cast<double>(v);
            }
            sc.xx[b * kQB8 + q] = xx;
            serr[b][q] = 0.0;
            if (q < nqb) {
                const double r = std::sqrt(xx) + a.alpha[ib + q] * ymax;
                expand[b] = expand[b] && static_cast<double>(d + 4) * 0x1p-53 * r * r * a.c[ib + q] <= kExpansionTol;
                // fp32 expansion: gamma_d of |x| alpha |y| for the dot, the fp32 roundings of ||x||^2, ||y||^2,
                // alpha, 2 alpha and alpha^2 and of the two multiply-adds, all on magnitudes <= r^2. The bound
                // holds only without overflow (r^2 far below fp32's largest value) and where underflow's absolute
                // error (< 2^-126 r per term, also with flush-to-zero) is far below it: other blocks skip the screen
                serr[b][q] = 1.01 * static_cast<double>(d + 12) * 0x1p-24 * r * r;
                screen[b] = screen[b] && r * r <= 0x1p100 && r * r >= 0x1p-60;
            }
        }
    }
    A* dist = Exact ? reinterpret_cast<A*>(sc.dd.data()) : reinterpret_cast<A*>(sc.df.data());
    float* w = sc.w.data();
    for (std::int64_t t0 = j0; t0 < j1; t0 += kTN) {
        const std::int64_t tn = std::min(kTN, j1 - t0);
        for (std::int64_t b = 0; b < nb; ++b) {
            const std::int64_t ib = i0 + b * kQB8, nqb = std::min(kQB8, nq - b * kQB8);
            if constexpr (Exact) {
                if (screen[b]) {
                    float rmin[kQB8];
                    dist_tile_f32x(sc.xf.data() + b * kQB8 * d, sc.xx + b * kQB8, na[b], pk, yyf, d, t0, tn,
                                   sc.df.data(), rmin);
                    if (screen_tile(a, Y, s, ib, nqb, t0, tn, sc.df.data(), rmin, serr[b],
                                    sc.xd.data() + b * kQB8 * d, na[b], sc)) {
                        continue;
                    }
                    screen[b] = false;  // the weights spread here: the full float64 tiles from now on
                }
                if (expand[b]) {
                    dist_tile_f64x(sc.xd.data() + b * kQB8 * d, sc.xx + b * kQB8, na[b], pk, yy, d, t0, tn,
                                   sc.dd.data());
                } else {
                    dist_tile_f64(sc.xd.data() + b * kQB8 * d, na[b], pk, d, t0, tn, sc.dd.data());
                }
            } else {
                dist_tile_f32(sc.xf.data() + b * kQB8 * d, na[b], pk, d, t0, tn, sc.df.data());
            }
            tile_softmax<A>(a, Y, pk, s, ib, nqb, t0, tn, dist, w, sc);
        }
    }
}

DIFFGEN_FAST_AVX512 void direct_item_avx512_exact(const DirectArgs<float>& a, const float* Y, const float* pk,
                                                  const double* yy, const float* yyf, double ymax, std::int64_t i0,
                                                  std::int64_t nq, std::int64_t j0, std::int64_t j1,
                                                  const StateRef& s, Scratch8& sc) {
    direct_item_avx512<true>(a, Y, pk, yy, yyf, ymax, i0, nq, j0, j1, s, sc);
}

DIFFGEN_FAST_AVX512 void direct_item_avx512_fast(const DirectArgs<float>& a, const float* Y, const float* pk,
                                                  const double* yy, double ymax, std::int64_t i0,
                                                 std::int64_t nq, std::int64_t j0, std::int64_t j1,
                                                 const StateRef& s, Scratch8& sc) {
    direct_item_avx512<false>(a, Y, pk, yy, nullptr, ymax, i0, nq, j0, j1, s, sc);
}

// The small-sigma screen of the exact AVX-512 kernel; DIFFGEN_FAST_CPU_SCREEN=0 turns it off (tests compare both).
bool screen_enabled() {
    static const bool ok = [] {
        const char* e = std::getenv("DIFFGEN_FAST_CPU_SCREEN");
        return e == nullptr || std::string(e) != "0";
    }();
    return ok;
}

bool use_avx512_direct() {
    static const bool ok = [] {
        if (const char* e = std::getenv("DIFFGEN_FAST_CPU_KERNEL")) {
            if (std::string(e) == "generic") return false;
        }
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    }();
    return ok;
}
#pragma GCC diagnostic pop
#endif  // DIFFGEN_FAST_HAS_MULTIVERSION

// Sc: the per-thread scratch type (constructed from d), QB: queries per item.
template <typename Sc, std::int64_t QB, typename T, typename Fn>
void run_direct(const DirectArgs<T>& a, std::int64_t M, StateRef s, Fn item) {
    const std::int64_t d = a.d, n = a.n;
    const int threads = get_num_threads();
    const std::int64_t qblocks = (M + QB - 1) / QB;
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
        Sc sc(d);
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t it = 0; it < items; ++it) {
            const std::int64_t p = it % parts, b = it / parts;
            const std::int64_t i0 = b * QB, nq = std::min(QB, M - i0);
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
                    const double* c, const double* alpha, bool exact, double* m, double* l, double* q, double* o,
                    const float* Y) {
    const DirectArgs<float> a{x, yT, n, d, c, alpha};
#if DIFFGEN_FAST_HAS_MULTIVERSION
    if (use_avx512_direct() && Y != nullptr) {
        std::vector<float> panels(static_cast<std::size_t>((n + kPanel - 1) / kPanel * kPanel * d));
        pack_panels(Y, n, d, panels.data());
        const float* pk = panels.data();
        std::vector<double> yyv;
        double ymax = 0.0;
        if (exact) {  // float64 ||y||^2 for the norm expansion, padded to the panels
            yyv.assign(static_cast<std::size_t>((n + kPanel - 1) / kPanel * kPanel), 0.0);
            row_sqnorms(Y, n, d, yyv.data());
            for (std::int64_t j = 0; j < n; ++j) ymax = std::max(ymax, yyv[j]);
            ymax = std::sqrt(ymax);
        }
        const double* yy = yyv.data();
        // the screen's fp32 ||y||^2 (padded like yy; its rounding is in the screen's error bound)
        std::vector<float> yyfv(exact && screen_enabled() ? yyv.size() : 0);
        for (std::size_t j = 0; j < yyfv.size(); ++j) yyfv[j] = static_cast<float>(yyv[j]);
        const float* yyf = yyfv.empty() ? nullptr : yyfv.data();
        auto item = [Y, pk, yy, yyf, ymax, exact](const DirectArgs<float>& a_, std::int64_t i0, std::int64_t nq,
                                             std::int64_t j0, std::int64_t j1, const StateRef& s_, Scratch8& sc) {
            if (exact) {
                direct_item_avx512_exact(a_, Y, pk, yy, yyf, ymax, i0, nq, j0, j1, s_, sc);
            } else {
                direct_item_avx512_fast(a_, Y, pk, yy, ymax, i0, nq, j0, j1, s_, sc);
            }
        };
        run_direct<Scratch8, kG * kQB8>(a, M, StateRef{m, l, q, o}, item);
        return;
    }
#endif
    if (exact) {
        run_direct<Scratch<double, float>, kQB>(a, M, StateRef{m, l, q, o}, direct_item_f32_exact);
    } else {
        run_direct<Scratch<float, float>, kQB>(a, M, StateRef{m, l, q, o}, direct_item_f32_fast);
    }
}

bool direct_reads_rows() {
#if DIFFGEN_FAST_HAS_MULTIVERSION
    return use_avx512_direct();
#else
    return false;
#endif
}

const char* direct_kernel_name() {
#if DIFFGEN_FAST_HAS_MULTIVERSION
    if (use_avx512_direct()) return "avx512 intrinsics";
#endif
    return simd_level();
}

void denoise_direct(const double* x, const double* yT, std::int64_t M, std::int64_t n, std::int64_t d,
                            const double* c, const double* alpha, bool /*exact*/, double* m, double* l, double* q,
                            double* o) {
    const DirectArgs<double> a{x, yT, n, d, c, alpha};
    run_direct<Scratch<double, double>, kQB>(a, M, StateRef{m, l, q, o}, direct_item_f64);
}

namespace {
template <typename T>
DIFFGEN_FAST_INLINE void sqnorms_rows(const T* DIFFGEN_FAST_RESTRICT Y, std::int64_t r0, std::int64_t r1,
                                      std::int64_t d, double* DIFFGEN_FAST_RESTRICT out) {
    for (std::int64_t r = r0; r < r1; ++r) {
        const T* y = Y + r * d;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (std::int64_t k = 0; k < d; ++k) acc += static_cast<double>(y[k]) * static_cast<double>(y[k]);
        out[r] = acc;
    }
}
DIFFGEN_FAST_MULTIVERSION void sqnorms_rows_f32(const float* Y, std::int64_t r0, std::int64_t r1, std::int64_t d,
                                                double* out) {
    sqnorms_rows<float>(Y, r0, r1, d, out);
}
DIFFGEN_FAST_MULTIVERSION void sqnorms_rows_f64(const double* Y, std::int64_t r0, std::int64_t r1, std::int64_t d,
                                                double* out) {
    sqnorms_rows<double>(Y, r0, r1, d, out);
}
inline void sqnorms_rows_any(const float* Y, std::int64_t r0, std::int64_t r1, std::int64_t d, double* out) {
    sqnorms_rows_f32(Y, r0, r1, d, out);
}
inline void sqnorms_rows_any(const double* Y, std::int64_t r0, std::int64_t r1, std::int64_t d, double* out) {
    sqnorms_rows_f64(Y, r0, r1, d, out);
}
}  // namespace

template <typename T>
void row_sqnorms(const T* Y, std::int64_t n, std::int64_t d, double* out) {
    const int threads = get_num_threads();
    const long long work = static_cast<long long>(n) * std::max<std::int64_t>(d, 1);
    constexpr std::int64_t kRows = 256;
    const std::int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && work >= (1 << 20))
    for (std::int64_t b = 0; b < blocks; ++b) {
        sqnorms_rows_any(Y, b * kRows, std::min(n, (b + 1) * kRows), d, out);
    }
}

template void row_sqnorms<float>(const float*, std::int64_t, std::int64_t, double*);
template void row_sqnorms<double>(const double*, std::int64_t, std::int64_t, double*);

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
