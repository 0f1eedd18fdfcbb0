// Vectorisation support for the CPU kernels: run-time ISA selection and a vectorisable exp.
//
// Kernels are written as plain loops over contiguous arrays that the compiler auto-vectorises. The wheel is
// compiled for the baseline ISA; DIFFGEN_FAST_MULTIVERSION on a (non-template) entry function makes GCC/Clang
// emit AVX-512, AVX2+FMA and baseline clones of it and pick one at load time from the CPU (ifunc). The inner
// templates are DIFFGEN_FAST_INLINE so they are compiled into each clone with its ISA. Elsewhere (MSVC, non-x86,
// DIFFGEN_FAST_NO_MULTIVERSION) the baseline build is the portable fallback.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define DIFFGEN_FAST_INLINE inline __attribute__((always_inline))
#else
#define DIFFGEN_FAST_INLINE inline
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DIFFGEN_FAST_NO_MULTIVERSION)
#define DIFFGEN_FAST_MULTIVERSION __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#define DIFFGEN_FAST_HAS_MULTIVERSION 1
#else
#define DIFFGEN_FAST_MULTIVERSION
#define DIFFGEN_FAST_HAS_MULTIVERSION 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DIFFGEN_FAST_RESTRICT __restrict__
#else
#define DIFFGEN_FAST_RESTRICT
#endif

namespace diffgen_fast {
namespace cpu {

// The instruction set the multiversioned kernels run with on this CPU: "avx512f", "avx2+fma" or "baseline".
inline const char* simd_level() {
#if DIFFGEN_FAST_HAS_MULTIVERSION
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "avx512f";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2+fma";
#endif
    return "baseline";
}

// out[j] = exp(z[j]) for z[j] <= 0 (softmax weights after the max shift), vectorisable. Relative error < 2e-7 on
// [-87, 0]; z < -87 (or -inf, or NaN-free underflow) gives exactly 0, which loses < e^-87 of the top weight.
// Cody-Waite reduction z = n ln2 + r, |r| <= ln2/2, then the degree-7 Taylor polynomial for e^r and 2^n from the exponent
// bits. ibuf is scratch of n int32.
DIFFGEN_FAST_INLINE void exp_nonpositive(const float* DIFFGEN_FAST_RESTRICT z, float* DIFFGEN_FAST_RESTRICT out,
                                         std::int32_t* DIFFGEN_FAST_RESTRICT ibuf, long n) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f;
    const float ln2_lo = 1.42860682030941723212e-6f;
    for (long j = 0; j < n; ++j) {
        float v = z[j];
        v = v < -87.0f ? -87.0f : v;  // also maps -inf; the result is zeroed below
        const float t = v * log2e;
        const float nf = static_cast<float>(static_cast<std::int32_t>(t - 0.5f));  // round to nearest for t <= 0
        const float r = (v - nf * ln2_hi) - nf * ln2_lo;
        float p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        out[j] = p;
        ibuf[j] = (static_cast<std::int32_t>(nf) + 127) << 23;
    }
    for (long j = 0; j < n; ++j) {
        float scale;
        std::memcpy(&scale, &ibuf[j], sizeof(float));
        out[j] = z[j] < -87.0f ? 0.0f : out[j] * scale;
    }
}

// The float64 version: relative error < 1e-15 on [-708, 0]; z < -708 gives 0 (degree-12 Taylor polynomial).
DIFFGEN_FAST_INLINE void exp_nonpositive(const double* DIFFGEN_FAST_RESTRICT z, double* DIFFGEN_FAST_RESTRICT out,
                                         std::int64_t* DIFFGEN_FAST_RESTRICT ibuf, long n) {
    const double log2e = 1.4426950408889634;
    const double ln2_hi = 0.693147180369123816490;
    const double ln2_lo = 1.90821492927058770002e-10;
    for (long j = 0; j < n; ++j) {
        double v = z[j];
        v = v < -708.0 ? -708.0 : v;
        const double t = v * log2e;
        const double nf = static_cast<double>(static_cast<std::int64_t>(t - 0.5));
        const double r = (v - nf * ln2_hi) - nf * ln2_lo;
        double p = 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        out[j] = p;
        ibuf[j] = (static_cast<std::int64_t>(nf) + 1023) << 52;
    }
    for (long j = 0; j < n; ++j) {
        double scale;
        std::memcpy(&scale, &ibuf[j], sizeof(double));
        out[j] = z[j] < -708.0 ? 0.0 : out[j] * scale;
    }
}

// Exponent below which exp_nonpositive returns exactly 0.
template <typename W>
constexpr W exp_cutoff();
template <>
constexpr float exp_cutoff<float>() {
    return -87.0f;
}
template <>
constexpr double exp_cutoff<double>() {
    return -708.0;
}

template <typename W>
struct ExpIndex;
template <>
struct ExpIndex<float> {
    using type = std::int32_t;
};
template <>
struct ExpIndex<double> {
    using type = std::int64_t;
};

}  // namespace cpu
}  // namespace diffgen_fast
