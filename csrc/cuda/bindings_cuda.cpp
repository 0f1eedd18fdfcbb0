// The CUDA kernels' face on diffgen_fast._C (compiled by the host compiler; no CUDA header is included here: the
// launchers in kernels.h take void* streams and return error texts). Built only when setup.py compiled the .cu files
// (DIFFGEN_FAST_WITH_CUDA). Pointers, sizes and the stream arrive as Python ints; every argument is validated here,
// before any CUDA call, and a bad one raises ValueError (TypeError for the wrong Python type) naming it. A CUDA error
// of a launch raises RuntimeError with the CUDA error text. diffgen_fast/_native_cuda.py is the only caller.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "bind_util.h"
#include "cuda/kernels.h"

namespace py = pybind11;

#ifndef DIFFGEN_FAST_NVCC_VERSION
#define DIFFGEN_FAST_NVCC_VERSION "unknown"
#endif
#ifndef DIFFGEN_FAST_CUDA_ARCHS
#define DIFFGEN_FAST_CUDA_ARCHS "unknown"
#endif

namespace {

using namespace diffgen_fast::bind;
namespace kc = diffgen_fast::cuda;

constexpr std::int64_t kMaxInt = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kMaxGridY = 65535;

void* as_stream(const py::object& s) { return reinterpret_cast<void*>(as_pointer(s, "stream")); }

// Element size of a dtype name ('float32' or 'float64'), naming the argument otherwise.
std::size_t float_dtype_size(const py::object& dtype_, const char* name) {
    if (!py::isinstance<py::str>(dtype_)) {
        throw py::type_error(std::string(name) + " must be a str ('float32' or 'float64'), got " + type_name(dtype_));
    }
    const std::string dtype = py::str(dtype_);
    if (dtype == "float32") return sizeof(float);
    if (dtype == "float64") return sizeof(double);
    throw py::value_error(std::string(name) + " must be 'float32' or 'float64', got '" + dtype + "'");
}

// a * b (* c) elements of `bytes` each must be addressable: raise ValueError naming the sizes otherwise.
void check_product(std::int64_t a, std::int64_t b, std::int64_t bytes, const std::string& what) {
    if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a / bytes) {
        throw py::value_error(what + " is too large (" + std::to_string(a) + " x " + std::to_string(b) + ")");
    }
}

void raise_if(const std::string& err) {
    if (!err.empty()) throw std::runtime_error("CUDA error: " + err);
}

std::string expected(const char* shape, const char* dtype) { return std::string("a device pointer to a ") + shape +
                                                                     " row-major " + dtype + " array"; }

void sqdist(const py::object& x_, const py::object& y_, const py::object& out_, const py::object& M_,
            const py::object& n_, const py::object& d_, const py::object& dtype_, const py::object& stream_) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), d = as_size(d_, "d");
    const std::size_t size = float_dtype_size(dtype_, "dtype");
    const std::uintptr_t x = as_pointer(x_, "x"), y = as_pointer(y_, "y"), out = as_pointer(out_, "out");
    void* stream = as_stream(stream_);
    if (d < 1) throw py::value_error("d must be >= 1, got " + std::to_string(d));
    check_product(M, d, static_cast<std::int64_t>(size), "x (M x d)");
    check_product(n, d, static_cast<std::int64_t>(size), "y (n x d)");
    check_product(M, n, sizeof(float), "out (M x n)");
    if (M == 0 || n == 0) return;
    const char* dt = size == sizeof(float) ? "float32" : "float64";
    require_pointer(x, size, "x", expected("[M, d]", dt).c_str());
    require_pointer(y, size, "y", expected("[n, d]", dt).c_str());
    require_pointer(out, sizeof(float), "out", expected("[M, n]", "float32").c_str());
    std::string err;
    {
        py::gil_scoped_release release;
        if (size == sizeof(float)) {
            err = kc::launch_sqdist_f32(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y),
                                        reinterpret_cast<float*>(out), M, n, d, stream);
        } else {
            err = kc::launch_sqdist_f64(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y),
                                        reinterpret_cast<float*>(out), M, n, d, stream);
        }
    }
    raise_if(err);
}

void select_topk(const py::object& dist_, const py::object& vals_, const py::object& idx_, const py::object& M_,
                 const py::object& n_, const py::object& k_, const py::object& stream_) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), k = as_size(k_, "k");
    const std::uintptr_t dist = as_pointer(dist_, "dist"), vals = as_pointer(vals_, "vals"),
                         idx = as_pointer(idx_, "idx");
    void* stream = as_stream(stream_);
    if (k < 1 || k > kc::kSelectMaxK) {
        throw py::value_error("k must be in [1, " + std::to_string(kc::kSelectMaxK) + "], got " + std::to_string(k));
    }
    if (k > n) {
        throw py::value_error("k must be <= n (the row length), got k=" + std::to_string(k) +
                              ", n=" + std::to_string(n));
    }
    if (n > kMaxInt) throw py::value_error("n must be < 2^31, got " + std::to_string(n));
    check_product(M, n, sizeof(float), "dist (M x n)");
    check_product(M, k, sizeof(std::int64_t), "idx (M x k)");
    if (M == 0) return;
    require_pointer(dist, sizeof(float), "dist", expected("[M, n]", "float32").c_str());
    require_pointer(vals, sizeof(float), "vals", expected("[M, k]", "float32").c_str());
    require_pointer(idx, sizeof(std::int64_t), "idx", expected("[M, k]", "int64").c_str());
    std::string err;
    {
        py::gil_scoped_release release;
        err = kc::launch_select_topk(reinterpret_cast<const float*>(dist), reinterpret_cast<float*>(vals),
                                     reinterpret_cast<std::int64_t*>(idx), M, n, static_cast<int>(k), stream);
    }
    raise_if(err);
}

void sqdist_pairs(const py::object& x_, const py::object& y_, const py::object& idx_, const py::object& out_,
                  const py::object& M_, const py::object& n_, const py::object& c_, const py::object& d_,
                  const py::object& dtype_, const py::object& stream_) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), c = as_size(c_, "c"), d = as_size(d_, "d");
    const std::size_t size = float_dtype_size(dtype_, "dtype");
    const std::uintptr_t x = as_pointer(x_, "x"), y = as_pointer(y_, "y"), idx = as_pointer(idx_, "idx"),
                         out = as_pointer(out_, "out");
    void* stream = as_stream(stream_);
    if (d < 1) throw py::value_error("d must be >= 1, got " + std::to_string(d));
    if (n < 1) throw py::value_error("n must be >= 1, got " + std::to_string(n));
    check_product(M, d, static_cast<std::int64_t>(size), "x (M x d)");
    check_product(n, d, static_cast<std::int64_t>(size), "y (n x d)");
    check_product(M, c, sizeof(double), "out (M x c)");
    if (M == 0 || c == 0) return;
    const char* dt = size == sizeof(float) ? "float32" : "float64";
    require_pointer(x, size, "x", expected("[M, d]", dt).c_str());
    require_pointer(y, size, "y", expected("[n, d]", dt).c_str());
    require_pointer(idx, sizeof(std::int64_t), "idx", expected("[M, c]", "int64").c_str());
    require_pointer(out, sizeof(double), "out", expected("[M, c]", "float64").c_str());
    std::string err;
    {
        py::gil_scoped_release release;
        if (size == sizeof(float)) {
            err = kc::launch_sqdist_pairs_f32(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y),
                                              reinterpret_cast<const std::int64_t*>(idx),
                                              reinterpret_cast<double*>(out), M, n, c, d, stream);
        } else {
            err = kc::launch_sqdist_pairs_f64(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y),
                                              reinterpret_cast<const std::int64_t*>(idx),
                                              reinterpret_cast<double*>(out), M, n, c, d, stream);
        }
    }
    raise_if(err);
}

void softmax_state(const py::object& x_, const py::object& y_, const py::object& alpha_, const py::object& c2_,
                   const py::object& m_, const py::object& l_, const py::object& q_, const py::object& o_,
                   const py::object& M_, const py::object& n_, const py::object& d_, const py::object& splits_,
                   const py::object& per_split_, const py::object& exact_, const py::object& stream_) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), d = as_size(d_, "d");
    const std::int64_t splits = as_size(splits_, "splits"), per_split = as_size(per_split_, "per_split");
    if (!py::isinstance<py::bool_>(exact_)) throw py::type_error("exact must be a bool, got " + type_name(exact_));
    const bool exact = exact_.cast<bool>();
    const std::uintptr_t x = as_pointer(x_, "x"), y = as_pointer(y_, "y"), alpha = as_pointer(alpha_, "alpha"),
                         c2 = as_pointer(c2_, "c2"), m = as_pointer(m_, "m"), l = as_pointer(l_, "l"),
                         q = as_pointer(q_, "q"), o = as_pointer(o_, "o");
    void* stream = as_stream(stream_);
    if (d < 1 || d > kc::kSoftmaxMaxD) {
        throw py::value_error("d must be in [1, " + std::to_string(kc::kSoftmaxMaxD) +
                              "] for the small-d CUDA kernel, got " + std::to_string(d));
    }
    if (splits < 1 || splits > kMaxGridY) {
        throw py::value_error("splits must be in [1, " + std::to_string(kMaxGridY) + "], got " +
                              std::to_string(splits));
    }
    if (per_split < 1) throw py::value_error("per_split must be >= 1, got " + std::to_string(per_split));
    if (per_split > std::numeric_limits<std::int64_t>::max() / splits || splits * per_split < n) {
        throw py::value_error("splits * per_split must cover n: splits=" + std::to_string(splits) +
                              ", per_split=" + std::to_string(per_split) + ", n=" + std::to_string(n));
    }
    check_product(M, d, sizeof(float), "x (M x d)");
    check_product(n, d, sizeof(float), "y (n x d)");
    check_product(splits, M, sizeof(double), "m (splits x M)");
    check_product(splits * M, d, sizeof(float), "o (splits x M x d)");
    if (M == 0) return;
    require_pointer(x, sizeof(float), "x", expected("[M, d]", "float32").c_str());
    if (n > 0) require_pointer(y, sizeof(float), "y", expected("[n, d]", "float32").c_str());
    require_pointer(alpha, sizeof(double), "alpha", expected("[M]", "float64").c_str());
    require_pointer(c2, sizeof(double), "c2", expected("[M]", "float64").c_str());
    require_pointer(m, sizeof(double), "m", expected("[splits, M]", "float64").c_str());
    require_pointer(l, sizeof(double), "l", expected("[splits, M]", "float64").c_str());
    require_pointer(q, sizeof(double), "q", expected("[splits, M]", "float64").c_str());
    if (o != 0) require_pointer(o, sizeof(float), "o", expected("[splits, M, d]", "float32").c_str());
    std::string err;
    {
        py::gil_scoped_release release;
        err = kc::launch_softmax_state(
            reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), reinterpret_cast<const double*>(alpha),
            reinterpret_cast<const double*>(c2), reinterpret_cast<double*>(m), reinterpret_cast<double*>(l),
            reinterpret_cast<double*>(q), reinterpret_cast<float*>(o), M, n, static_cast<int>(d), splits, per_split,
            exact, stream);
    }
    raise_if(err);
}

}  // namespace

namespace diffgen_fast {

py::dict cuda_build_info() {
    py::dict info;
    info["nvcc_version"] = DIFFGEN_FAST_NVCC_VERSION;
    info["arch"] = DIFFGEN_FAST_CUDA_ARCHS;
    info["cudart"] = "static";
    std::string err;
    info["runtime_version"] = kc::runtime_version(&err);
    std::string driver_err;
    info["driver_version"] = kc::driver_version(&driver_err);
    info["driver_error"] = driver_err.empty() ? py::object(py::none()) : py::object(py::str(driver_err));
    std::string count_err;
    const int count = kc::device_count(&count_err);
    info["device_count"] = count < 0 ? 0 : count;
    info["device_error"] = count_err.empty() ? py::object(py::none()) : py::object(py::str(count_err));
    info["select_max_k"] = kc::kSelectMaxK;
    info["softmax_max_d"] = kc::kSoftmaxMaxD;
    return info;
}

void register_cuda_kernels(py::module_& mod) {
    mod.attr("CUDA_SELECT_MAX_K") = kc::kSelectMaxK;
    mod.attr("CUDA_SOFTMAX_MAX_D") = kc::kSoftmaxMaxD;
    mod.def("cuda_sqdist", &sqdist, py::arg("x"), py::arg("y"), py::arg("out"), py::arg("M"), py::arg("n"),
            py::arg("d"), py::arg("dtype"), py::arg("stream"),
            "out[i, j] = ||x_i - y_j||^2 as direct differences (fp32 or fp64 arithmetic by dtype), stored as float32.\n"
            "x [M, d], y [n, d] of dtype ('float32' or 'float64'), out [M, n] float32: device pointers (ints), row-major\n"
            "contiguous. stream: a cudaStream_t as int (0: default stream). Asynchronous.");
    mod.def("cuda_select_topk", &select_topk, py::arg("dist"), py::arg("vals"), py::arg("idx"), py::arg("M"),
            py::arg("n"), py::arg("k"), py::arg("stream"),
            "Per row of dist [M, n] float32 (no NaN): the k smallest by (value, column), ascending, into vals [M, k]\n"
            "float32 and idx [M, k] int64 (columns). 1 <= k <= min(n, CUDA_SELECT_MAX_K), n < 2^31. Asynchronous.");
    mod.def("cuda_sqdist_pairs", &sqdist_pairs, py::arg("x"), py::arg("y"), py::arg("idx"), py::arg("out"),
            py::arg("M"), py::arg("n"), py::arg("c"), py::arg("d"), py::arg("dtype"), py::arg("stream"),
            "out[i, j] = ||x_i - y_idx[i, j]||^2 in float64 from differences. x [M, d], y [n, d] of dtype, idx [M, c]\n"
            "int64 (0 <= idx < n; an index outside gives NaN), out [M, c] float64. Asynchronous.");
    mod.def("cuda_softmax_state", &softmax_state, py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("c2"),
            py::arg("m"), py::arg("l"), py::arg("q"), py::arg("o"), py::arg("M"), py::arg("n"), py::arg("d"),
            py::arg("splits"), py::arg("per_split"), py::arg("exact"), py::arg("stream"),
            "Partial softmax states of the small-d fused kernel (1 <= d <= CUDA_SOFTMAX_MAX_D). Split s covers\n"
            "training rows [s * per_split, min(n, (s + 1) * per_split)); splits * per_split >= n, splits <= 65535.\n"
            "z_j = -||x_i - alpha_i y_j||^2 c2_i. x [M, d], y [n, d] float32; alpha, c2 [M] float64; m, l, q\n"
            "[splits, M] float64; o [splits, M, d] float32, or 0 to skip o (log-sum-exp only). exact: float64\n"
            "differences, distances and exp; else fp32 distances and expf. Asynchronous.");
}

}  // namespace diffgen_fast
