// Binding of the native CPU kNN (csrc/cpu/knn.h): _C.knn_topk.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "bind_util.h"
#include "cpu/knn.h"

namespace py = pybind11;

namespace diffgen_fast {
namespace {

using namespace diffgen_fast::bind;

// a * b * c fits in int64 (all >= 0)?
bool product_fits(std::int64_t a, std::int64_t b, std::int64_t c) {
    const std::int64_t max = std::numeric_limits<std::int64_t>::max();
    if (a == 0 || b == 0 || c == 0) return true;
    if (a > max / b) return false;
    return a * b <= max / c;
}

void knn_topk(const py::object& x_, const py::object& y_, const py::object& M_, const py::object& n_,
              const py::object& d_, const py::object& k_, const py::object& dtype_, const py::object& out_dist_,
              const py::object& out_index_, const py::object& index_offset_) {
    const std::int64_t M = as_size(M_, "M");
    const std::int64_t n = as_size(n_, "n");
    const std::int64_t d = as_size(d_, "d");
    const std::int64_t k = as_size(k_, "k");
    const std::int64_t index_offset = as_size(index_offset_, "index_offset");
    if (n < 1) throw py::value_error("n must be >= 1 (training points), got " + std::to_string(n));
    if (d < 1) throw py::value_error("d must be >= 1, got " + std::to_string(d));
    if (k < 1 || k > n) {
        throw py::value_error("k must satisfy 1 <= k <= n = " + std::to_string(n) + ", got " + std::to_string(k));
    }
    if (!py::isinstance<py::str>(dtype_)) {
        throw py::type_error("dtype must be a str ('float32' or 'float64'), got " + type_name(dtype_));
    }
    const std::string dtype = py::str(dtype_);
    std::int64_t size = 0;
    if (dtype == "float32") {
        size = sizeof(float);
    } else if (dtype == "float64") {
        size = sizeof(double);
    } else {
        throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
    }
    if (!product_fits(M, d, size)) throw py::value_error("M * d is too large (M=" + std::to_string(M) + ")");
    if (!product_fits(n, d, size)) throw py::value_error("n * d is too large (n=" + std::to_string(n) + ")");
    if (!product_fits(M, k, 8)) throw py::value_error("M * k is too large (M=" + std::to_string(M) + ")");
    if (index_offset > std::numeric_limits<std::int64_t>::max() - n) {
        throw py::value_error("index_offset + n overflows int64 (index_offset=" + std::to_string(index_offset) + ")");
    }

    const std::uintptr_t x = as_pointer(x_, "x");
    const std::uintptr_t y = as_pointer(y_, "y");
    const std::uintptr_t out_dist = as_pointer(out_dist_, "out_dist");
    const std::uintptr_t out_index = as_pointer(out_index_, "out_index");
    const std::string xw = "an [M, d] row-major " + dtype + " array";
    const std::string yw = "an [n, d] row-major " + dtype + " array";
    require_pointer(y, static_cast<std::size_t>(size), "y", yw.c_str());
    if (M == 0) return;
    require_pointer(x, static_cast<std::size_t>(size), "x", xw.c_str());
    require_pointer(out_dist, alignof(double), "out_dist", "an [M, k] float64 array");
    require_pointer(out_index, alignof(std::int64_t), "out_index", "an [M, k] int64 array");

    py::gil_scoped_release release;
    if (size == static_cast<std::int64_t>(sizeof(float))) {
        cpu::knn_topk<float>(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), M, n, d, k,
                             reinterpret_cast<double*>(out_dist), reinterpret_cast<std::int64_t*>(out_index),
                             index_offset);
    } else {
        cpu::knn_topk<double>(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y), M, n, d, k,
                              reinterpret_cast<double*>(out_dist), reinterpret_cast<std::int64_t*>(out_index),
                              index_offset);
    }
}

}  // namespace

void register_cpu_knn(py::module_& mod) {
    mod.def("knn_topk", &knn_topk, py::arg("x"), py::arg("y"), py::arg("M"), py::arg("n"), py::arg("d"),
            py::arg("k"), py::arg("dtype"), py::arg("out_dist"), py::arg("out_index"), py::arg("index_offset"),
            "Exact k nearest neighbours in squared L2 of x [M, d] among y [n, d] (row-major, dtype 'float32' or\n"
            "'float64', finite; d >= 1, 1 <= k <= n).\n\n"
            "Pointers are Python ints (tensor.data_ptr()). Writes out_dist [M, k] float64 (ascending) and\n"
            "out_index [M, k] int64 (row of y plus index_offset); equal distances are ordered by index. Candidates\n"
            "from an approximate pass are re-ranked in float64 and certified, so the result is exact and the same\n"
            "for any thread count. Releases the GIL.");
    mod.def("cpu_knn_kernel", &cpu::knn_kernel_name,
            "The first pass of knn_topk for float32 data with d > 32 on this CPU: 'bf16 screen (avx512bf16)' or\n"
            "'fp32 panels'.");
}

}  // namespace diffgen_fast
