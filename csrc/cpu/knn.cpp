#include "knn.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "simd.h"

#if DIFFGEN_FAST_HAS_MULTIVERSION
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vector values passed between always-inline helpers: no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace diffgen_fast {
namespace cpu {
namespace {

using i64 = std::int64_t;

// ---------------------------------------------------------------------------------------------------------------
// 64-byte vectors: GCC/Clang vector extensions (one zmm in the AVX-512 clone, two ymm in the AVX2 clone), or a
// plain array elsewhere.

constexpr int kVecBytes = 64;

#if defined(__GNUC__) || defined(__clang__)
typedef float VecF __attribute__((vector_size(64)));
typedef float VecF8 __attribute__((vector_size(32)));
typedef float VecF4 __attribute__((vector_size(16)));
typedef double VecD __attribute__((vector_size(64)));
typedef double VecD4 __attribute__((vector_size(32)));
typedef double VecD2 __attribute__((vector_size(16)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
    using type = VecF;
};
template <>
struct VecOf<double> {
    using type = VecD;
};

template <typename V>
DIFFGEN_FAST_INLINE V vmin(V a, V b) {
#if defined(__clang__)
    return __builtin_elementwise_min(a, b);
#else
    return a < b ? a : b;
#endif
}

// Smallest lane, by halving (a few shuffles instead of one extract per lane).
DIFFGEN_FAST_INLINE float hmin(VecF v) {
    VecF8 a, b;
    std::memcpy(&a, &v, 32);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
    const VecF8 m8 = vmin(a, b);
    VecF4 c, e;
    std::memcpy(&c, &m8, 16);
    std::memcpy(&e, reinterpret_cast<const char*>(&m8) + 16, 16);
    const VecF4 m4 = vmin(c, e);
    const float x = m4[0] < m4[1] ? m4[0] : m4[1];
    const float y = m4[2] < m4[3] ? m4[2] : m4[3];
    return x < y ? x : y;
}

DIFFGEN_FAST_INLINE double hmin(VecD v) {
    VecD4 a, b;
    std::memcpy(&a, &v, 32);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
    const VecD4 m4 = vmin(a, b);
    VecD2 c, e;
    std::memcpy(&c, &m4, 16);
    std::memcpy(&e, reinterpret_cast<const char*>(&m4) + 16, 16);
    const VecD2 m2 = vmin(c, e);
    return m2[0] < m2[1] ? m2[0] : m2[1];
}
#else
template <typename T>
struct PVec {
    static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
    T v[L];
    T& operator[](int i) { return v[i]; }
    T operator[](int i) const { return v[i]; }
    friend PVec operator+(const PVec& a, const PVec& b) {
        PVec r;
        for (int i = 0; i < L; ++i) r.v[i] = a.v[i] + b.v[i];
        return r;
    }
    friend PVec operator-(const PVec& a, const PVec& b) {
        PVec r;
        for (int i = 0; i < L; ++i) r.v[i] = a.v[i] - b.v[i];
        return r;
    }
    friend PVec operator*(const PVec& a, const PVec& b) {
        PVec r;
        for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i];
        return r;
    }
    PVec& operator+=(const PVec& b) {
        for (int i = 0; i < L; ++i) v[i] += b.v[i];
        return *this;
    }
};

template <typename T>
struct VecOf {
    using type = PVec<T>;
};

template <typename T>
DIFFGEN_FAST_INLINE PVec<T> vmin(const PVec<T>& a, const PVec<T>& b) {
    PVec<T> r;
    for (int i = 0; i < PVec<T>::L; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
}

template <typename T>
DIFFGEN_FAST_INLINE T hmin(const PVec<T>& a) {
    T m = a.v[0];
    for (int i = 1; i < PVec<T>::L; ++i) m = a.v[i] < m ? a.v[i] : m;
    return m;
}
#endif

template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

// Training points per panel: two vectors.
template <typename T>
constexpr int kPanel = 2 * kLanes<T>;

template <typename T>
DIFFGEN_FAST_INLINE Vec<T> vload(const T* p) {
    Vec<T> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
DIFFGEN_FAST_INLINE void vstore(T* p, const Vec<T>& v) {
    std::memcpy(p, &v, sizeof(v));
}

// Broadcast of one value. GCC compiles a lane loop or a scalar-vector operation into a store-and-reload of the
// lanes inside the target clones; an explicit shuffle of lane 0 stays a register broadcast.
#if defined(__GNUC__) && !defined(__clang__)
typedef std::int32_t VecI32 __attribute__((vector_size(64)));
typedef std::int64_t VecI64 __attribute__((vector_size(64)));
DIFFGEN_FAST_INLINE VecF splat_lane0(VecF v) { return __builtin_shuffle(v, VecI32{}); }
DIFFGEN_FAST_INLINE VecD splat_lane0(VecD v) { return __builtin_shuffle(v, VecI64{}); }
#endif

template <typename T>
DIFFGEN_FAST_INLINE Vec<T> vsplat(T s) {
#if defined(__GNUC__) && !defined(__clang__)
    Vec<T> v{};
    std::memcpy(&v, &s, sizeof(T));
    return splat_lane0(v);
#elif defined(__clang__)
    return s - Vec<T>{};
#else
    Vec<T> v;
    for (int i = 0; i < kLanes<T>; ++i) v[i] = s;
    return v;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Buffers

struct AlignedFree {
    void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T, AlignedFree> aligned_array(std::size_t count) {
    std::size_t bytes = std::max<std::size_t>(count, 1) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return std::unique_ptr<T, AlignedFree>(static_cast<T*>(p));
}

// ---------------------------------------------------------------------------------------------------------------
// The plan of one call

template <typename T>
struct Plan {
    const T* x;
    const T* y;
    i64 M, n, d, k, kk;
    bool diff;  // direct differences (small d) or the norm expansion
    int mr;     // queries per register block: 8 with AVX-512, 4 otherwise
    // training points, packed in panels of kPanel points: ypack [npan][d][kPanel], bias [npan][kPanel]
    // (bias: ||y||^2 for the norm expansion, 0 for differences; +inf for the padding past n)
    const T* ypack;
    const T* bias;
    i64 npan;
    // bf16 screening (pass 1 on bf16-rounded data by AVX512-BF16 dot products; see panel_tile_bf16): the points
    // packed as bf16 pairs ypack16 [npan][d2][kPanel] (uint32: coordinates 2p, 2p + 1), d2 = ceil(d / 2)
    bool bf16;
    const std::uint32_t* ypack16;
    i64 d2;
    double ymax2;       // max ||y||^2
    const T* xx_t;      // [M] ||x||^2 rounded to T (norm expansion)
    const double* xx;   // [M] ||x||^2
    i64 qb;             // queries per block
    i64 splits;         // the training panels are split in this many ranges
    i64 pan_per_split;  // panels per range
    i64 tile_panels;    // panels per L2 tile
    // the current query group [q0, q0 + mg): candidates [splits][mg][kk] and their counts
    i64 q0, mg;
    T* cand_d;
    i64* cand_i;
    i64* cand_n;
    double* out_dist;
    i64* out_index;
    i64 index_offset;
};

// One register block: distances of MR queries (packed [d][MR]) to the kPanel points of one panel, written to
// out [MR][kPanel]; rowmin[r] is the smallest of row r.
template <typename T, int MR, bool DIFF>
DIFFGEN_FAST_INLINE void panel_tile(const T* DIFFGEN_FAST_RESTRICT xp, const T* DIFFGEN_FAST_RESTRICT yp,
                                    const T* DIFFGEN_FAST_RESTRICT bias, const T* DIFFGEN_FAST_RESTRICT xxp, i64 d,
                                    T* DIFFGEN_FAST_RESTRICT out, T* DIFFGEN_FAST_RESTRICT rowmin) {
    constexpr int L = kLanes<T>;
    constexpr int P = kPanel<T>;
    Vec<T> acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
        acc0[r] = vsplat<T>(T(0));
        acc1[r] = vsplat<T>(T(0));
    }
    for (i64 p = 0; p < d; ++p) {
        const Vec<T> y0 = vload<T>(yp + p * P);
        const Vec<T> y1 = vload<T>(yp + p * P + L);
        for (int r = 0; r < MR; ++r) {
            const Vec<T> xv = vsplat<T>(xp[p * MR + r]);
            if (DIFF) {
                const Vec<T> t0 = xv - y0;
                const Vec<T> t1 = xv - y1;
                acc0[r] += t0 * t0;
                acc1[r] += t1 * t1;
            } else {
                acc0[r] += xv * y0;
                acc1[r] += xv * y1;
            }
        }
    }
    const Vec<T> b0 = vload<T>(bias);
    const Vec<T> b1 = vload<T>(bias + L);
    for (int r = 0; r < MR; ++r) {
        Vec<T> d0, d1;
        if (DIFF) {
            d0 = acc0[r] + b0;
            d1 = acc1[r] + b1;
        } else {
            const Vec<T> xx = vsplat<T>(xxp[r]);
            d0 = (xx + b0) - (acc0[r] + acc0[r]);
            d1 = (xx + b1) - (acc1[r] + acc1[r]);
        }
        vstore<T>(out + r * P, d0);
        vstore<T>(out + r * P + L, d1);
        rowmin[r] = hmin(vmin(d0, d1));
    }
}

// bf16 rounding (to nearest even) of a finite float, and a pair of them packed as AVX512-BF16 reads it.
inline std::uint32_t bf16_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return u >> 16;
}

inline std::uint32_t bf16_pair(const float* v, i64 p, i64 d) {
    const std::uint32_t lo = bf16_bits(v[2 * p]);
    const std::uint32_t hi = 2 * p + 1 < d ? bf16_bits(v[2 * p + 1]) : 0u;
    return lo | (hi << 16);
}

#if DIFFGEN_FAST_HAS_MULTIVERSION
// GCC 12's intrinsics headers trip -Wmaybe-uninitialized on _mm512_setzero / undefined (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define DIFFGEN_FAST_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

// The register block of the bf16 screen: MR queries (packed bf16 pairs [d2][MR]) against one panel of kPanel
// points, x.y accumulated by vdpbf16ps (exact bf16 products, fp32 sums), then ||x||^2 + ||y||^2 - 2 x.y in fp32 as
// panel_tile does. Twice the multiply-adds of an fp32 FMA per instruction; its error bound is lower_bound_of's.
template <int MR>
DIFFGEN_FAST_BF16 void panel_tile_bf16(const std::uint32_t* DIFFGEN_FAST_RESTRICT xp,
                                                           const std::uint32_t* DIFFGEN_FAST_RESTRICT yp,
                                                           const float* DIFFGEN_FAST_RESTRICT bias,
                                                           const float* DIFFGEN_FAST_RESTRICT xxp, i64 d2,
                                                           float* DIFFGEN_FAST_RESTRICT out,
                                                           float* DIFFGEN_FAST_RESTRICT rowmin) {
    __m512 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (i64 p = 0; p < d2; ++p) {
        const __m512bh y0 = (__m512bh)_mm512_loadu_si512(yp + p * 32);
        const __m512bh y1 = (__m512bh)_mm512_loadu_si512(yp + p * 32 + 16);
        for (int r = 0; r < MR; ++r) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[p * MR + r]));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, y0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, y1);
        }
    }
    const __m512 b0 = _mm512_loadu_ps(bias);
    const __m512 b1 = _mm512_loadu_ps(bias + 16);
    for (int r = 0; r < MR; ++r) {
        const __m512 xx = _mm512_set1_ps(xxp[r]);
        const __m512 d0 = _mm512_sub_ps(_mm512_add_ps(xx, b0), _mm512_add_ps(acc0[r], acc0[r]));
        const __m512 d1 = _mm512_sub_ps(_mm512_add_ps(xx, b1), _mm512_add_ps(acc1[r], acc1[r]));
        _mm512_storeu_ps(out + r * 32, d0);
        _mm512_storeu_ps(out + r * 32 + 16, d1);
        rowmin[r] = _mm512_reduce_min_ps(_mm512_min_ps(d0, d1));
    }
}
#endif

// Bounded max-heap of (approximate distance, index). Offers v (< the threshold); returns the new threshold: the
// root once the heap holds kk entries, +inf before.
template <typename T>
DIFFGEN_FAST_INLINE T heap_offer(T* hd, i64* hi, i64& count, i64 kk, T v, i64 id) {
    i64 pos;
    if (count < kk) {
        pos = count++;
        while (pos > 0) {
            const i64 parent = (pos - 1) / 2;
            if (!(hd[parent] < v)) break;
            hd[pos] = hd[parent];
            hi[pos] = hi[parent];
            pos = parent;
        }
        hd[pos] = v;
        hi[pos] = id;
        return count == kk ? hd[0] : std::numeric_limits<T>::infinity();
    }
    pos = 0;
    for (;;) {
        i64 child = 2 * pos + 1;
        if (child >= kk) break;
        if (child + 1 < kk && hd[child] < hd[child + 1]) ++child;
        if (!(v < hd[child])) break;
        hd[pos] = hd[child];
        hi[pos] = hi[child];
        pos = child;
    }
    hd[pos] = v;
    hi[pos] = id;
    return hd[0];
}

// Pass 1 for one task: the queries of block b against the panels of split s (BF16: the bf16 screen).
template <typename T, int MR, bool DIFF, bool BF16 = false>
DIFFGEN_FAST_INLINE void run_task_impl(const Plan<T>& pl, i64 task) {
    constexpr int P = kPanel<T>;
    const i64 nblocks = (pl.mg + pl.qb - 1) / pl.qb;
    const i64 b = task % nblocks;
    const i64 s = task / nblocks;
    const i64 qa = b * pl.qb;  // within the group
    const i64 nq = std::min(pl.qb, pl.mg - qa);
    const i64 pan0 = s * pl.pan_per_split;
    const i64 pan1 = std::min(pl.npan, pan0 + pl.pan_per_split);
    const i64 d = pl.d;
    const i64 kk = pl.kk;
    const i64 nmb = (nq + MR - 1) / MR;

    // The block's queries packed [micro-block][d][MR]; the tail is padded with copies of the last query.
    const i64 d2 = pl.d2;
    std::vector<T> xpack(BF16 ? 0 : static_cast<std::size_t>(nmb * d * MR));
    std::vector<std::uint32_t> xpack16(BF16 ? static_cast<std::size_t>(nmb * d2 * MR) : 0);
    std::vector<T> xxpack(static_cast<std::size_t>(nmb * MR));
    for (i64 mb = 0; mb < nmb; ++mb) {
        for (int r = 0; r < MR; ++r) {
            const i64 qi = std::min(nq - 1, mb * MR + r);
            const i64 q = pl.q0 + qa + qi;
            const T* xr = pl.x + q * d;
            if constexpr (BF16) {
                std::uint32_t* dst = xpack16.data() + mb * d2 * MR + r;
                for (i64 p = 0; p < d2; ++p) dst[p * MR] = bf16_pair(xr, p, d);
            } else {
                T* dst = xpack.data() + mb * d * MR + r;
                for (i64 p = 0; p < d; ++p) dst[p * MR] = xr[p];
            }
            xxpack[mb * MR + r] = DIFF ? T(0) : pl.xx_t[q];
        }
    }
    T* hd[MR];
    i64* hi[MR];
    i64* hn[MR];
    for (i64 qi = 0; qi < nq; ++qi) pl.cand_n[s * pl.mg + qa + qi] = 0;

    alignas(64) T out[MR * P];
    alignas(64) T rowmin[MR];
    T thr[MR];
    for (i64 t0 = pan0; t0 < pan1; t0 += pl.tile_panels) {
        const i64 t1 = std::min(pan1, t0 + pl.tile_panels);
        for (i64 mb = 0; mb < nmb; ++mb) {
            const int rows = static_cast<int>(std::min<i64>(MR, nq - mb * MR));
            for (int r = 0; r < MR; ++r) {
                const i64 slot = s * pl.mg + qa + mb * MR + std::min(r, rows - 1);
                hd[r] = pl.cand_d + slot * kk;
                hi[r] = pl.cand_i + slot * kk;
                hn[r] = pl.cand_n + slot;
                thr[r] = *hn[r] == kk ? hd[r][0] : std::numeric_limits<T>::infinity();
            }
            const T* xxp = xxpack.data() + mb * MR;
            for (i64 pan = t0; pan < t1; ++pan) {
#if DIFFGEN_FAST_HAS_MULTIVERSION
                if constexpr (BF16) {
                    panel_tile_bf16<MR>(xpack16.data() + mb * d2 * MR, pl.ypack16 + pan * d2 * P, pl.bias + pan * P,
                                        xxp, d2, out, rowmin);
                } else
#endif
                {
                    panel_tile<T, MR, DIFF>(xpack.data() + mb * d * MR, pl.ypack + pan * d * P, pl.bias + pan * P,
                                            xxp, d, out, rowmin);
                }
                for (int r = 0; r < rows; ++r) {
                    if (!(rowmin[r] < thr[r])) continue;
                    const T* o = out + r * P;
                    T t = thr[r];
                    for (int j = 0; j < P; ++j) {
                        if (o[j] < t) t = heap_offer<T>(hd[r], hi[r], *hn[r], kk, o[j], pan * P + j);
                    }
                    thr[r] = t;
                }
            }
        }
    }
}

template <typename T>
DIFFGEN_FAST_INLINE double exact_sqdist(const T* a, const T* b, i64 d) {
    double s = 0.0;
    for (i64 p = 0; p < d; ++p) {
        const double t = static_cast<double>(a[p]) - static_cast<double>(b[p]);
        s += t * t;
    }
    return s;
}

template <typename T>
constexpr double unit_roundoff() {
    return sizeof(T) == sizeof(float) ? 0x1p-24 : 0x1p-53;
}

inline double gamma_of(double m, double u) { return m * u / (1.0 - m * u); }

// The smallest float64 distance (as exact_sqdist computes it) that a point can have when its approximate distance
// from pass 1 was >= t: certified from the error bounds of both computations.
template <typename T>
DIFFGEN_FAST_INLINE double lower_bound_of(const Plan<T>& pl, i64 q, double t) {
    if (t == std::numeric_limits<double>::infinity()) return t;
    const double d = static_cast<double>(pl.d);
    const double g64 = gamma_of(d + 2.0, 0x1p-53);
    double lb;
    if (pl.diff) {
        // Direct differences in T: |approx - true| <= gamma_{d+2} true.
        lb = t / (1.0 + gamma_of(d + 2.0, unit_roundoff<T>()));
    } else if (pl.bf16) {
        // The bf16 screen: each coordinate rounded to bf16 (relative 2^-8), so each product is off by at most
        // (2^-7 + 2^-16) |x_k y_k|, and the exact bf16 products are summed in fp32 (gamma_d of their magnitudes):
        // |acc - x.y| <= e_dot = (2^-7 + 2^-16 + gamma_d (1 + 2^-8)^2) ||x|| max||y||. The distance doubles it and
        // adds the fp32 roundings of both norms and the two additions (gamma_4 of the magnitudes). vdpbf16ps
        // flushes subnormal inputs and results to zero: at most 2^-126 (1 + |x_k| + |y_k|) per multiply-add,
        // covered by the absolute term d 2^-120 (1 + ||x|| + max||y||).
        const double xx = pl.xx[q];
        const double xy = std::sqrt(xx * pl.ymax2);
        const double e_dot = (0x1p-7 + 0x1p-16 + gamma_of(d, 0x1p-24) * (1.0 + 0x1p-7)) * xy;
        const double e = 2.0 * e_dot + gamma_of(4.0, 0x1p-24) * (xx + pl.ymax2 + 2.0 * xy) +
                         d * 0x1p-120 * (1.0 + std::sqrt(xx) + std::sqrt(pl.ymax2));
        lb = t - 1.01 * e;
    } else {
        // Norm expansion: |approx - true| <= gamma_{d+6} (||x||^2 + ||y||^2 + 2 ||x|| ||y||), with the roundings
        // of both norms to T and the two additions included in the d + 6.
        const double xx = pl.xx[q];
        const double e = gamma_of(d + 6.0, unit_roundoff<T>()) * (xx + pl.ymax2 + 2.0 * std::sqrt(xx * pl.ymax2));
        lb = t - 1.01 * e;
    }
    // The float64 recompute is within gamma_{d+2} (relative) of the true distance; one more margin for the rounding
    // of this arithmetic itself.
    return lb * (1.0 - g64) * (1.0 - 0x1p-40) - 0x1p-1000;
}

struct Cand {
    double dist;
    i64 index;
};

inline bool cand_less(const Cand& a, const Cand& b) {
    return a.dist < b.dist || (a.dist == b.dist && a.index < b.index);
}

// Sorts the first k of c by (distance, index) and says whether they are certified to be the exact top-k given
// that every point outside c had an approximate distance >= t.
// A list shorter than k (some approximate distances were not finite and never entered a heap) is never certified.
template <typename T>
DIFFGEN_FAST_INLINE bool select_and_certify(const Plan<T>& pl, i64 q, std::vector<Cand>& c, double t) {
    const i64 k = pl.k;
    if (static_cast<i64>(c.size()) < k) return false;
    std::partial_sort(c.begin(), c.begin() + k, c.end(), cand_less);
    return lower_bound_of(pl, q, t) > c[static_cast<std::size_t>(k - 1)].dist;
}

// True when the approximate pass of query q may have overflowed T (inf or NaN distances, which never enter a heap
// and break the error bounds): every approximate distance and every term of the norm expansion is at most
// (||x|| + max ||y||)^2 up to rounding, so below a sixteenth of T's largest value nothing overflows.
template <typename T>
DIFFGEN_FAST_INLINE bool may_overflow(const Plan<T>& pl, i64 q) {
    const double s = std::sqrt(pl.xx[q]) + std::sqrt(pl.ymax2);
    return !(s * s < 0.0625 * static_cast<double>(std::numeric_limits<T>::max()));
}

// The exact top-k of query q by brute force: every distance in float64 as differences, ordered by (distance, index).
// Distances that overflow float64 are +inf and order by index (the caller reports them).
template <typename T>
DIFFGEN_FAST_INLINE void brute_force_query(const Plan<T>& pl, i64 q, std::vector<Cand>& c) {
    const i64 d = pl.d;
    const T* xq = pl.x + q * d;
    c.clear();
    c.reserve(static_cast<std::size_t>(pl.n));
    for (i64 j = 0; j < pl.n; ++j) {
        const double v = exact_sqdist(xq, pl.y + j * d, d);
        c.push_back({std::isnan(v) ? std::numeric_limits<double>::infinity() : v, j});
    }
    std::partial_sort(c.begin(), c.begin() + pl.k, c.end(), cand_less);
}

// A query that could not be certified: all its approximate distances, then the kc smallest re-ranked, doubling kc.
template <typename T, bool DIFF, bool BF16 = false>
DIFFGEN_FAST_INLINE void redo_query(const Plan<T>& pl, i64 q, i64 kc, std::vector<Cand>& c) {
    constexpr int P = kPanel<T>;
    const i64 d = pl.d;
    const T* xq = pl.x + q * d;
    std::vector<T> approx(static_cast<std::size_t>(pl.npan * P));
    alignas(64) T rowmin[1];
    const T xxq = DIFF ? T(0) : pl.xx_t[q];
#if DIFFGEN_FAST_HAS_MULTIVERSION
    if constexpr (BF16) {
        std::vector<std::uint32_t> x16(static_cast<std::size_t>(pl.d2));
        for (i64 p = 0; p < pl.d2; ++p) x16[p] = bf16_pair(xq, p, d);
        for (i64 pan = 0; pan < pl.npan; ++pan) {
            panel_tile_bf16<1>(x16.data(), pl.ypack16 + pan * pl.d2 * P, pl.bias + pan * P, &xxq, pl.d2,
                               approx.data() + pan * P, rowmin);
        }
    } else
#endif
    {
        for (i64 pan = 0; pan < pl.npan; ++pan) {
            panel_tile<T, 1, DIFF>(xq, pl.ypack + pan * d * P, pl.bias + pan * P, &xxq, d, approx.data() + pan * P,
                                   rowmin);
        }
    }
    std::vector<i64> order(static_cast<std::size_t>(pl.n));
    for (;;) {
        kc = std::min(pl.n, kc);
        for (i64 j = 0; j < pl.n; ++j) order[j] = j;
        double t = std::numeric_limits<double>::infinity();
        if (kc < pl.n) {
            const T* a = approx.data();
            // NaN (not expected: may_overflow routes such queries to the brute force) sorts as +inf, so that the
            // comparison stays a strict weak ordering.
            const auto key = [a](i64 i) {
                const T v = a[i];
                return std::isnan(v) ? std::numeric_limits<T>::infinity() : v;
            };
            std::nth_element(order.begin(), order.begin() + (kc - 1), order.end(), [&key](i64 i, i64 j) {
                const T vi = key(i);
                const T vj = key(j);
                return vi < vj || (vi == vj && i < j);
            });
            t = static_cast<double>(key(order[kc - 1]));
        }
        c.clear();
        for (i64 j = 0; j < kc; ++j) c.push_back({exact_sqdist(xq, pl.y + order[j] * d, d), order[j]});
        if (select_and_certify(pl, q, c, t) || kc == pl.n) return;
        kc *= 2;
    }
}

// Pass 2 for one query: the union of its candidates over the splits, re-ranked in float64, certified, written.
template <typename T, bool DIFF, bool BF16 = false>
DIFFGEN_FAST_INLINE void finish_query_impl(const Plan<T>& pl, i64 q) {
    const i64 d = pl.d;
    const i64 kk = pl.kk;
    const i64 qi = q - pl.q0;
    const T* xq = pl.x + q * d;
    std::vector<Cand> c;
    double* od = pl.out_dist + q * pl.k;
    i64* oi = pl.out_index + q * pl.k;
    if (may_overflow(pl, q)) {
        brute_force_query(pl, q, c);
        for (i64 j = 0; j < pl.k; ++j) {
            od[j] = c[static_cast<std::size_t>(j)].dist;
            oi[j] = c[static_cast<std::size_t>(j)].index + pl.index_offset;
        }
        return;
    }
    c.reserve(static_cast<std::size_t>(pl.splits * kk));
    double t = std::numeric_limits<double>::infinity();
    for (i64 s = 0; s < pl.splits; ++s) {
        const i64 slot = s * pl.mg + qi;
        const i64 cnt = pl.cand_n[slot];
        const T* hd = pl.cand_d + slot * kk;
        const i64* hi = pl.cand_i + slot * kk;
        // A full heap's root bounds the split's points left out from below; a heap that is not full holds every
        // point of its split.
        if (cnt == kk) t = std::min(t, static_cast<double>(hd[0]));
        for (i64 j = 0; j < cnt; ++j) c.push_back({exact_sqdist(xq, pl.y + hi[j] * d, d), hi[j]});
    }
    if (!select_and_certify(pl, q, c, t)) redo_query<T, DIFF, BF16>(pl, q, 2 * kk, c);
    if (static_cast<i64>(c.size()) < pl.k) brute_force_query(pl, q, c);  // never read past a short list
    for (i64 j = 0; j < pl.k; ++j) {
        od[j] = c[static_cast<std::size_t>(j)].dist;
        oi[j] = c[static_cast<std::size_t>(j)].index + pl.index_offset;
    }
}

// Multiversioned entry points (non-templates, so GCC clones them per ISA; the templates are inlined into each).
// The OpenMP regions stay in the driver below and call these per task, so every task runs the clone of the CPU.

template <typename T>
DIFFGEN_FAST_INLINE void run_task_dispatch(const Plan<T>& pl, i64 task) {
    if (pl.mr == 8) {
        if (pl.diff) {
            run_task_impl<T, 8, true>(pl, task);
        } else {
            run_task_impl<T, 8, false>(pl, task);
        }
    } else {
        if (pl.diff) {
            run_task_impl<T, 4, true>(pl, task);
        } else {
            run_task_impl<T, 4, false>(pl, task);
        }
    }
}

DIFFGEN_FAST_MULTIVERSION void run_task_generic(const Plan<float>& pl, i64 task) { run_task_dispatch<float>(pl, task); }
DIFFGEN_FAST_MULTIVERSION void run_task(const Plan<double>& pl, i64 task) { run_task_dispatch<double>(pl, task); }

DIFFGEN_FAST_MULTIVERSION void finish_query_generic(const Plan<float>& pl, i64 q) {
    if (pl.diff) {
        finish_query_impl<float, true>(pl, q);
    } else {
        finish_query_impl<float, false>(pl, q);
    }
}
DIFFGEN_FAST_MULTIVERSION void finish_query(const Plan<double>& pl, i64 q) {
    if (pl.diff) {
        finish_query_impl<double, true>(pl, q);
    } else {
        finish_query_impl<double, false>(pl, q);
    }
}

#if DIFFGEN_FAST_HAS_MULTIVERSION
DIFFGEN_FAST_BF16 void run_task_bf16(const Plan<float>& pl, i64 task) { run_task_impl<float, 8, false, true>(pl, task); }
DIFFGEN_FAST_BF16 void finish_query_bf16(const Plan<float>& pl, i64 q) { finish_query_impl<float, false, true>(pl, q); }
#pragma GCC diagnostic pop

// The bf16 screen runs for float32 data with the norm expansion on a CPU with AVX512-BF16, unless
// DIFFGEN_FAST_CPU_KERNEL=generic.
bool use_bf16_knn() {
    static const bool ok = [] {
        if (const char* e = std::getenv("DIFFGEN_FAST_CPU_KERNEL")) {
            if (std::strcmp(e, "generic") == 0) return false;
        }
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bf16");
    }();
    return ok;
}
#else
bool use_bf16_knn() { return false; }
#endif

void run_task(const Plan<float>& pl, i64 task) {
#if DIFFGEN_FAST_HAS_MULTIVERSION
    if (pl.bf16) return run_task_bf16(pl, task);
#endif
    run_task_generic(pl, task);
}

void finish_query(const Plan<float>& pl, i64 q) {
#if DIFFGEN_FAST_HAS_MULTIVERSION
    if (pl.bf16) return finish_query_bf16(pl, q);
#endif
    finish_query_generic(pl, q);
}

// The bf16 pairs of panels [pan0, pan1) of y (zero past d and past n).
void pack_panels_bf16(const float* y, i64 n, i64 d, i64 d2, std::uint32_t* ypack16, i64 pan0, i64 pan1) {
    constexpr int P = kPanel<float>;
    for (i64 pan = pan0; pan < pan1; ++pan) {
        std::uint32_t* dst = ypack16 + pan * d2 * P;
        for (int j = 0; j < P; ++j) {
            const i64 i = pan * P + j;
            for (i64 p = 0; p < d2; ++p) dst[p * P + j] = i < n ? bf16_pair(y + i * d, p, d) : 0u;
        }
    }
}

// Packs panels [pan0, pan1) of y, with their bias, and returns the largest ||y||^2 among them.
template <typename T>
double pack_panels(const T* y, i64 n, i64 d, bool diff, T* ypack, T* bias, i64 pan0, i64 pan1) {
    constexpr int P = kPanel<T>;
    double ymax2 = 0.0;
    for (i64 pan = pan0; pan < pan1; ++pan) {
        T* dst = ypack != nullptr ? ypack + pan * d * P : nullptr;  // null: the bias only
        for (int j = 0; j < P; ++j) {
            const i64 i = pan * P + j;
            if (i < n) {
                const T* yr = y + i * d;
                double yy = 0.0;
                for (i64 p = 0; p < d; ++p) yy += static_cast<double>(yr[p]) * static_cast<double>(yr[p]);
                if (dst != nullptr) {
                    for (i64 p = 0; p < d; ++p) dst[p * P + j] = yr[p];
                }
                ymax2 = std::max(ymax2, yy);
                bias[pan * P + j] = diff ? T(0) : static_cast<T>(yy);
            } else {
                if (dst != nullptr) {
                    for (i64 p = 0; p < d; ++p) dst[p * P + j] = T(0);
                }
                bias[pan * P + j] = std::numeric_limits<T>::infinity();
            }
        }
    }
    return ymax2;
}

constexpr i64 kSmallD = 32;                 // direct differences up to this d, the norm expansion above
constexpr i64 kTileBytes = 256 << 10;       // training panels per L2 tile
constexpr i64 kQueryBlockBytes = 256 << 10;  // packed queries per block
constexpr i64 kCandBytes = 64 << 20;        // candidate storage per query group
constexpr i64 kMinParallelWork = 1 << 20;   // M * n * d below which one thread runs

}  // namespace

template <typename T>
void knn_topk(const T* x, const T* y, i64 M, i64 n, i64 d, i64 k, double* out_dist, i64* out_index,
              i64 index_offset) {
    if (M <= 0 || n <= 0 || k <= 0) return;
    constexpr int P = kPanel<T>;
    const int threads = std::max(1, get_num_threads());
    const double work = static_cast<double>(M) * static_cast<double>(n) * static_cast<double>(d);
    const bool parallel = threads > 1 && work >= static_cast<double>(kMinParallelWork);
    (void)parallel;

    Plan<T> pl{};
    pl.x = x;
    pl.y = y;
    pl.M = M;
    pl.n = n;
    pl.d = d;
    pl.k = k;
    pl.diff = d <= kSmallD;
    pl.bf16 = std::is_same<T, float>::value && !pl.diff && use_bf16_knn();
    pl.d2 = (d + 1) / 2;
    // the bf16 screen's error is wider: more slack so that its candidates still certify the top-k
    pl.kk = std::min(n, pl.bf16 ? k + 16 + k / 4 : k + 8 + k / 8);
    pl.mr = std::strcmp(simd_level(), "avx512f") == 0 ? 8 : 4;
    pl.out_dist = out_dist;
    pl.out_index = out_index;
    pl.index_offset = index_offset;

    // Pack the training points (and their norms).
    pl.npan = (n + P - 1) / P;
    auto ypack = aligned_array<T>(pl.bf16 ? 0 : static_cast<std::size_t>(pl.npan * d * P));
    auto ypack16 = aligned_array<std::uint32_t>(pl.bf16 ? static_cast<std::size_t>(pl.npan * pl.d2 * P) : 0);
    pl.ypack16 = ypack16.get();
    auto bias = aligned_array<T>(static_cast<std::size_t>(pl.npan * P));
    pl.ypack = ypack.get();
    pl.bias = bias.get();
    {
        const i64 step = 64;
        const i64 nsteps = (pl.npan + step - 1) / step;
        std::vector<double> part(static_cast<std::size_t>(nsteps), 0.0);
        T* yp = ypack.get();
        T* bp = bias.get();
        std::uint32_t* y16 = ypack16.get();
        const bool diff = pl.diff;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel && nsteps > 1)
#endif
        for (i64 i = 0; i < nsteps; ++i) {
            const i64 p0 = i * step, p1 = std::min(pl.npan, (i + 1) * step);
            if constexpr (std::is_same<T, float>::value) {
                if (pl.bf16) pack_panels_bf16(y, n, d, pl.d2, y16, p0, p1);
            }
            // the bias (and ymax2); the fp32 panels themselves only without the bf16 screen
            part[i] = pack_panels<T>(y, n, d, diff, pl.bf16 ? nullptr : yp, bp, p0, p1);
        }
        pl.ymax2 = *std::max_element(part.begin(), part.end());
    }
    std::vector<double> xx(static_cast<std::size_t>(M));
    std::vector<T> xx_t(static_cast<std::size_t>(M));
    for (i64 q = 0; q < M; ++q) {
        double s = 0.0;
        for (i64 p = 0; p < d; ++p) s += static_cast<double>(x[q * d + p]) * static_cast<double>(x[q * d + p]);
        xx[q] = s;
        xx_t[q] = static_cast<T>(s);
    }
    pl.xx = xx.data();
    pl.xx_t = xx_t.data();

    // Blocks of queries (a few per thread, packed queries within kQueryBlockBytes), and splits of the training
    // panels when there are too few blocks to keep every thread busy.
    const i64 mr = pl.mr;
    i64 qb = (M + 4 * threads - 1) / (4 * threads);
    qb = (qb + mr - 1) / mr * mr;
    const i64 qb_cap = std::max<i64>(mr, kQueryBlockBytes / (d * static_cast<i64>(sizeof(T))) / mr * mr);
    qb = std::max<i64>(mr, std::min<i64>({qb, 256, qb_cap}));
    pl.qb = qb;
    const i64 nblocks_all = (M + qb - 1) / qb;
    i64 splits = 1;
    if (parallel && nblocks_all < 2 * threads) {
        splits = std::min<i64>(pl.npan, (2 * threads + nblocks_all - 1) / nblocks_all);
    }
    pl.pan_per_split = (pl.npan + splits - 1) / splits;
    pl.splits = (pl.npan + pl.pan_per_split - 1) / pl.pan_per_split;
    pl.tile_panels = std::max<i64>(1, kTileBytes / (pl.bf16 ? pl.d2 * P * 4 : d * P * static_cast<i64>(sizeof(T))));

    // Query groups bound the candidate storage.
    const i64 per_query = pl.splits * pl.kk * static_cast<i64>(sizeof(T) + sizeof(i64));
    i64 mg = std::max<i64>(qb, kCandBytes / per_query / qb * qb);
    mg = std::min(mg, M);
    auto cand_d = aligned_array<T>(static_cast<std::size_t>(pl.splits * mg * pl.kk));
    auto cand_i = aligned_array<i64>(static_cast<std::size_t>(pl.splits * mg * pl.kk));
    std::vector<i64> cand_n(static_cast<std::size_t>(pl.splits * mg));
    pl.cand_d = cand_d.get();
    pl.cand_i = cand_i.get();
    pl.cand_n = cand_n.data();

    for (i64 q0 = 0; q0 < M; q0 += mg) {
        pl.q0 = q0;
        pl.mg = std::min(mg, M - q0);
        const i64 ntasks = (pl.mg + qb - 1) / qb * pl.splits;
        const Plan<T>& cpl = pl;
        // An exception (bad_alloc) must not leave an OpenMP region: the first one is kept and rethrown after it.
        std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel && ntasks > 1)
#endif
        for (i64 t = 0; t < ntasks; ++t) {
            try {
                run_task(cpl, t);
            } catch (...) {
#ifdef _OPENMP
#pragma omp critical(diffgen_fast_knn_error)
#endif
                if (!error) error = std::current_exception();
            }
        }
        if (error) std::rethrow_exception(error);
        const i64 q1 = q0 + pl.mg;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (parallel && pl.mg > 16)
#endif
        for (i64 q = q0; q < q1; ++q) {
            try {
                finish_query(cpl, q);
            } catch (...) {
#ifdef _OPENMP
#pragma omp critical(diffgen_fast_knn_error)
#endif
                if (!error) error = std::current_exception();
            }
        }
        if (error) std::rethrow_exception(error);
    }
}

const char* knn_kernel_name() { return use_bf16_knn() ? "bf16 screen (avx512bf16)" : "fp32 panels"; }

template void knn_topk<float>(const float*, const float*, i64, i64, i64, i64, double*, i64*, i64);
template void knn_topk<double>(const double*, const double*, i64, i64, i64, i64, double*, i64*, i64);

}  // namespace cpu
}  // namespace diffgen_fast
