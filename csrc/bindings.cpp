// diffgen_fast._C: the native kernels behind a pybind11 module.
//
// No torch headers: Python (torch) allocates every buffer and passes raw pointers, shapes and dtypes as plain
// Python values, so the module builds in seconds, works with any torch version, and imports on a machine with
// no GPU driver. Every argument is checked here, before any pointer is touched; a bad one raises ValueError
// (TypeError for a value of the wrong Python type) naming the argument. diffgen_fast/_native.py is the only
// Python module that calls into this one.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "bind_util.h"
#include "cpu/merge.h"
#include "cpu/parallel.h"

namespace py = pybind11;

#define DIFFGEN_FAST_STRINGIFY_(x) #x
#define DIFFGEN_FAST_STRINGIFY(x) DIFFGEN_FAST_STRINGIFY_(x)

#ifdef DIFFGEN_FAST_VERSION
static const char* const kVersion = DIFFGEN_FAST_STRINGIFY(DIFFGEN_FAST_VERSION);
#else
static const char* const kVersion = "unknown";
#endif

namespace {

using namespace diffgen_fast::bind;

template <typename T>
void run_merge(std::uintptr_t m1, std::uintptr_t l1, std::uintptr_t q1, std::uintptr_t o1, std::uintptr_t m2,
               std::uintptr_t l2, std::uintptr_t q2, std::uintptr_t o2, std::int64_t M, std::int64_t d) {
    py::gil_scoped_release release;
    diffgen_fast::cpu::merge_softmax_states<T>(
        reinterpret_cast<double*>(m1), reinterpret_cast<double*>(l1), reinterpret_cast<double*>(q1),
        reinterpret_cast<T*>(o1), reinterpret_cast<const double*>(m2), reinterpret_cast<const double*>(l2),
        reinterpret_cast<const double*>(q2), reinterpret_cast<const T*>(o2), M, d);
}

void merge_softmax_states(const py::object& m1_, const py::object& l1_, const py::object& q1_,
                          const py::object& o1_, const py::object& m2_, const py::object& l2_,
                          const py::object& q2_, const py::object& o2_, const py::object& M_, const py::object& d_,
                          const py::object& o_dtype_) {
    const std::int64_t M = as_size(M_, "M");
    const std::int64_t d = as_size(d_, "d");
    if (!py::isinstance<py::str>(o_dtype_)) {
        throw py::type_error("o_dtype must be a str ('float32' or 'float64'), got " + type_name(o_dtype_));
    }
    const std::string o_dtype = py::str(o_dtype_);
    std::size_t o_size = 0;
    if (o_dtype == "float32") {
        o_size = sizeof(float);
    } else if (o_dtype == "float64") {
        o_size = sizeof(double);
    } else {
        throw py::value_error("o_dtype must be 'float32' or 'float64', got '" + o_dtype + "'");
    }
    if (d > 0 && M > std::numeric_limits<std::int64_t>::max() / d / static_cast<std::int64_t>(o_size)) {
        throw py::value_error("M * d is too large (M=" + std::to_string(M) + ", d=" + std::to_string(d) + ")");
    }

    const char* f64 = "a float64 array of M elements";
    const std::uintptr_t m1 = as_pointer(m1_, "m1"), l1 = as_pointer(l1_, "l1"), q1 = as_pointer(q1_, "q1");
    const std::uintptr_t m2 = as_pointer(m2_, "m2"), l2 = as_pointer(l2_, "l2"), q2 = as_pointer(q2_, "q2");
    std::uintptr_t o1 = as_pointer(o1_, "o1"), o2 = as_pointer(o2_, "o2");
    if (M == 0) return;
    require_pointer(m1, alignof(double), "m1", f64);
    require_pointer(l1, alignof(double), "l1", f64);
    require_pointer(q1, alignof(double), "q1", f64);
    require_pointer(m2, alignof(double), "m2", f64);
    require_pointer(l2, alignof(double), "l2", f64);
    require_pointer(q2, alignof(double), "q2", f64);
    if (d == 0) {
        o1 = o2 = 0;  // nothing to touch: an [M, 0] array may have any pointer, null included
    } else if ((o1 == 0) != (o2 == 0)) {
        throw py::value_error(std::string(o1 == 0 ? "o1" : "o2") + " is 0 (no o) but " + (o1 == 0 ? "o2" : "o1") +
                              " is not: pass both o pointers or neither");
    } else if (o1 != 0) {
        const std::string what = "an [M, d] row-major " + o_dtype + " array";
        require_pointer(o1, o_size, "o1", what.c_str());
        require_pointer(o2, o_size, "o2", what.c_str());
    }

    if (o_size == sizeof(float)) {
        run_merge<float>(m1, l1, q1, o1, m2, l2, q2, o2, M, d);
    } else {
        run_merge<double>(m1, l1, q1, o1, m2, l2, q2, o2, M, d);
    }
}

py::list simd_flags() {
    py::list flags;
#ifdef __SSE2__
    flags.append("__SSE2__");
#endif
#ifdef __SSE4_1__
    flags.append("__SSE4_1__");
#endif
#ifdef __SSE4_2__
    flags.append("__SSE4_2__");
#endif
#ifdef __AVX__
    flags.append("__AVX__");
#endif
#ifdef __AVX2__
    flags.append("__AVX2__");
#endif
#ifdef __FMA__
    flags.append("__FMA__");
#endif
#ifdef __AVX512F__
    flags.append("__AVX512F__");
#endif
#ifdef __ARM_NEON
    flags.append("__ARM_NEON");
#endif
#ifdef __ARM_FEATURE_SVE
    flags.append("__ARM_FEATURE_SVE");
#endif
    return flags;
}

py::dict build_info() {
    py::dict info;
    info["version"] = kVersion;
#if defined(__clang__)
    info["compiler"] = "clang";
    info["compiler_version"] = __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = "gcc";
    info["compiler_version"] = __VERSION__;
#elif defined(_MSC_VER)
    info["compiler"] = "msvc";
    info["compiler_version"] = std::to_string(_MSC_FULL_VER);
#else
    info["compiler"] = "unknown";
    info["compiler_version"] = "unknown";
#endif
#if defined(_MSVC_LANG)
    info["cxx_standard"] = static_cast<long>(_MSVC_LANG);
#else
    info["cxx_standard"] = static_cast<long>(__cplusplus);
#endif
    info["openmp"] = diffgen_fast::cpu::openmp_enabled();
#ifdef _OPENMP
    info["openmp_version"] = static_cast<long>(_OPENMP);
#else
    info["openmp_version"] = py::none();
#endif
    info["max_threads"] = diffgen_fast::cpu::get_num_threads();
    info["simd"] = simd_flags();
#ifdef __OPTIMIZE__
    info["optimized"] = true;
#else
    info["optimized"] = false;
#endif
#ifdef DIFFGEN_FAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_build"] = diffgen_fast::cuda_build_info();
#else
    info["cuda"] = false;
#endif
    info["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                               std::to_string(PYBIND11_VERSION_MINOR) + "." +
                               std::to_string(PYBIND11_VERSION_PATCH);
    return info;
}

void set_num_threads(const py::object& n_) {
    if (!is_int(n_)) throw py::type_error("n must be an int, got " + type_name(n_));
    int overflow = 0;
    const long long n = PyLong_AsLongLongAndOverflow(n_.ptr(), &overflow);
    if (overflow != 0 || n < 1 || n > std::numeric_limits<int>::max()) {
        throw py::value_error("n must be a positive number of threads, got " + std::string(py::str(n_)));
    }
    diffgen_fast::cpu::set_num_threads(static_cast<int>(n));
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "diffgen-fast native kernels (raw pointers in, no torch headers). Use diffgen_fast._native.";
    mod.attr("__version__") = kVersion;

    mod.def("merge_softmax_states", &merge_softmax_states, py::arg("m1"), py::arg("l1"), py::arg("q1"),
            py::arg("o1"), py::arg("m2"), py::arg("l2"), py::arg("q2"), py::arg("o2"), py::arg("M"), py::arg("d"),
            py::arg("o_dtype"),
            "Merge softmax state 2 into state 1 in place.\n\n"
            "Pointers are Python ints (tensor.data_ptr()). m, l, q: float64 [M]; o1, o2: row-major contiguous\n"
            "[M, d] arrays of o_dtype ('float32' or 'float64'), or both 0 for a state without o. State 1 and\n"
            "state 2 may be the same arrays but must not overlap partially. Releases the GIL.");
    mod.def("build_info", &build_info,
            "How this module was built: compiler, C++ standard, OpenMP, SIMD flags, CUDA, version.");
    mod.def("set_num_threads", &set_num_threads, py::arg("n"),
            "Set the number of OpenMP threads later kernel calls use (n >= 1; no-op without OpenMP).\n"
            "This module's own setting: torch's thread count, and the OpenMP runtime it may share, are untouched.");
    mod.def("get_num_threads", &diffgen_fast::cpu::get_num_threads,
            "The number of threads later kernel calls use: set_num_threads's value, else the OpenMP default\n"
            "(OMP_NUM_THREADS or the core count); 1 without OpenMP.");

    diffgen_fast::register_cpu_kernels(mod);
    diffgen_fast::register_cpu_knn(mod);
#ifdef DIFFGEN_FAST_WITH_CUDA
    diffgen_fast::register_cuda_kernels(mod);
#endif
}
