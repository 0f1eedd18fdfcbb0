// Bindings of the native CPU denoiser kernels (backend="cpu"): see csrc/cpu/denoise.h. Every argument is checked
// before any pointer is touched; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_util.h"
#include "cpu/denoise.h"
#include "cpu/simd.h"

namespace py = pybind11;

namespace diffgen_fast {
namespace {

using namespace bind;

std::size_t dtype_size(const std::string& dtype, const char* name) {
    if (dtype == "float32") return 4;
    if (dtype == "float64") return 8;
    throw py::value_error(std::string(name) + " must be 'float32' or 'float64', got '" + dtype + "'");
}

std::uintptr_t ptr(const py::handle& h, const char* name, std::size_t align, const char* what, bool nullable = false) {
    const std::uintptr_t p = as_pointer(h, name);
    if (nullable && p == 0) return 0;
    require_pointer(p, align, name, what);
    return p;
}

void denoise_direct_py(const py::object& x, const py::object& yT, const py::object& M_, const py::object& n_,
                       const py::object& d_, const py::object& c, const py::object& alpha, bool exact,
                       const py::object& m, const py::object& l, const py::object& q, const py::object& o,
                       const std::string& dtype, const py::object& y) {
    const std::size_t es = dtype_size(dtype, "dtype");
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), d = as_size(d_, "d");
    if (d < 1) throw py::value_error("d must be >= 1, got 0");
    if (M == 0 || n == 0) return;
    const auto px = ptr(x, "x", es, "a contiguous [M, d] array of dtype");
    const auto pY = ptr(y, "y", es, "a contiguous [n, d] array of dtype or 0", true);
    const auto py_ = ptr(yT, "yT", es, "a contiguous [d, n] array of dtype (or 0 when y is given)", pY != 0);
    if (py_ == 0 && (es != 4 || !cpu::direct_reads_rows()))
        throw py::value_error("yT is required here (float64 data, or a CPU without the AVX-512 kernel)");
    const auto pc = ptr(c, "c", 8, "float64 [M]");
    const auto pa = ptr(alpha, "alpha", 8, "float64 [M]");
    const auto pm = ptr(m, "m", 8, "float64 [M]");
    const auto pl = ptr(l, "l", 8, "float64 [M]");
    const auto pq = ptr(q, "q", 8, "float64 [M]");
    const auto po = ptr(o, "o", 8, "float64 [M, d] or 0 (no output)", true);
    py::gil_scoped_release release;
    auto D = [](std::uintptr_t p) { return reinterpret_cast<double*>(p); };
    if (es == 4) {
        cpu::denoise_direct(reinterpret_cast<const float*>(px), reinterpret_cast<const float*>(py_), M, n, d, D(pc),
                            D(pa), exact, D(pm), D(pl), D(pq), D(po), reinterpret_cast<const float*>(pY));
    } else {
        cpu::denoise_direct(reinterpret_cast<const double*>(px), reinterpret_cast<const double*>(py_), M, n, d,
                            D(pc), D(pa), exact, D(pm), D(pl), D(pq), D(po));
    }
}

void denoise_epilogue_py(const py::object& S, const py::object& M_, const py::object& n_, const py::object& ldS_,
                         const py::object& a2c, const py::object& off, const py::object& m, const py::object& l,
                         const py::object& q, const py::object& o, const py::object& d_, const py::object& flags,
                         const std::string& dtype) {
    const std::size_t es = dtype_size(dtype, "dtype");
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), ldS = as_size(ldS_, "ldS"), d = as_size(d_, "d");
    if (ldS < n) throw py::value_error("ldS must be >= n, got ldS=" + std::to_string(ldS) + ", n=" + std::to_string(n));
    if (M == 0 || n == 0) return;
    const auto pS = ptr(S, "S", es, "a [M, n] array of dtype with row stride ldS");
    const auto pa = ptr(a2c, "a2c", 8, "float64 [M]");
    const auto pf = ptr(off, "off", 8, "float64 [M]");
    const auto pm = ptr(m, "m", 8, "float64 [M]");
    const auto pl = ptr(l, "l", 8, "float64 [M]");
    const auto pq = ptr(q, "q", 8, "float64 [M]");
    const auto po = ptr(o, "o", 8, "float64 [M, d] or 0 (no output)", true);
    const auto pg = ptr(flags, "nonzero_cols", 1, "uint8 [n] or 0", true);
    if (po != 0 && d < 1) throw py::value_error("d must be >= 1 when o is given");
    py::gil_scoped_release release;
    auto D = [](std::uintptr_t p) { return reinterpret_cast<double*>(p); };
    auto* g = reinterpret_cast<std::uint8_t*>(pg);
    if (es == 4) {
        cpu::denoise_epilogue<float>(reinterpret_cast<float*>(pS), M, n, ldS, D(pa), D(pf), D(pm), D(pl), D(pq), D(po),
                                     d, g);
    } else {
        cpu::denoise_epilogue<double>(reinterpret_cast<double*>(pS), M, n, ldS, D(pa), D(pf), D(pm), D(pl), D(pq),
                                      D(po), d, g);
    }
}

void row_sqnorms_py(const py::object& y, const py::object& n_, const py::object& d_, const py::object& out,
                    const std::string& dtype) {
    const std::size_t es = dtype_size(dtype, "dtype");
    const std::int64_t n = as_size(n_, "n"), d = as_size(d_, "d");
    if (n == 0) return;
    const auto pyy = ptr(y, "y", es, "a contiguous [n, d] array of dtype");
    const auto po = ptr(out, "out", 8, "float64 [n]");
    py::gil_scoped_release release;
    if (es == 4) {
        cpu::row_sqnorms(reinterpret_cast<const float*>(pyy), n, d, reinterpret_cast<double*>(po));
    } else {
        cpu::row_sqnorms(reinterpret_cast<const double*>(pyy), n, d, reinterpret_cast<double*>(po));
    }
}

void refine_candidates_py(const py::object& T, const py::object& M_, const py::object& n_, const py::object& ldT_,
                          const py::object& x, const py::object& Y, const py::object& d_, const py::object& alpha,
                          const py::object& xx, const py::object& lo, const py::object& budget_,
                          const py::object& shift, const py::object& count) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), ldT = as_size(ldT_, "ldT"), d = as_size(d_, "d");
    const std::int64_t budget = as_size(budget_, "budget");
    if (ldT < n) throw py::value_error("ldT must be >= n, got ldT=" + std::to_string(ldT) + ", n=" + std::to_string(n));
    if (d < 1) throw py::value_error("d must be >= 1, got 0");
    if (M == 0 || n == 0) return;
    const auto pT = ptr(T, "T", 4, "a float32 [M, n] array with row stride ldT");
    const auto px = ptr(x, "x", 4, "a contiguous float32 [M, d] array");
    const auto pY = ptr(Y, "Y", 4, "a contiguous float32 [n, d] array");
    const auto pa = ptr(alpha, "alpha", 8, "float64 [M]");
    const auto pxx = ptr(xx, "xx", 8, "float64 [M]");
    const auto plo = ptr(lo, "lo", 4, "float32 [M]");
    const auto ps = ptr(shift, "shift", 8, "float64 [M]");
    const auto pc = ptr(count, "count", 8, "int64 [M]");
    py::gil_scoped_release release;
    cpu::refine_candidates(reinterpret_cast<float*>(pT), M, n, ldT, reinterpret_cast<const float*>(px),
                           reinterpret_cast<const float*>(pY), d, reinterpret_cast<const double*>(pa),
                           reinterpret_cast<const double*>(pxx), reinterpret_cast<const float*>(plo), budget,
                           reinterpret_cast<double*>(ps), reinterpret_cast<std::int64_t*>(pc));
}

std::int64_t sparse_pv_py(const py::object& W, const py::object& M_, const py::object& n_, const py::object& ldW_,
                          const py::object& Y, const py::object& d_, const py::object& o, double tail_w,
                          const py::object& max_nnz_) {
    const std::int64_t M = as_size(M_, "M"), n = as_size(n_, "n"), ldW = as_size(ldW_, "ldW"), d = as_size(d_, "d");
    const std::int64_t max_nnz = as_size(max_nnz_, "max_nnz");
    if (ldW < n) throw py::value_error("ldW must be >= n, got ldW=" + std::to_string(ldW) + ", n=" + std::to_string(n));
    if (d < 1) throw py::value_error("d must be >= 1, got 0");
    if (!(tail_w >= 0.0 && tail_w < 1.0)) throw py::value_error("tail_w must be in [0, 1)");
    if (M == 0 || n == 0) return 0;
    const auto pW = ptr(W, "W", 4, "a float32 [M, n] array with row stride ldW");
    const auto pY = ptr(Y, "Y", 4, "a contiguous float32 [n, d] array");
    const auto po = ptr(o, "o", 8, "a contiguous float64 [M, d] array");
    py::gil_scoped_release release;
    return cpu::sparse_pv(reinterpret_cast<const float*>(pW), M, n, ldW, reinterpret_cast<const float*>(pY), d,
                          reinterpret_cast<double*>(po), tail_w, max_nnz);
}

}  // namespace

void register_cpu_kernels(py::module_& mod) {
    mod.def("denoise_direct", &denoise_direct_py, py::arg("x"), py::arg("yT"), py::arg("M"), py::arg("n"),
            py::arg("d"), py::arg("c"), py::arg("alpha"), py::arg("exact"), py::arg("m"), py::arg("l"), py::arg("q"),
            py::arg("o"), py::arg("dtype"), py::arg("y") = py::int_(0),
            "Fused direct-difference softmax denoiser over one training chunk, updating the state (m, l, q, o) in\n"
            "place. x: [M, d], yT: [d, n] (the chunk transposed), contiguous, of dtype ('float32'/'float64');\n"
            "c = 1/(2 sigma^2), alpha: float64 [M]; m, l, q: float64 [M]; o: float64 [M, d] or 0. exact: float64\n"
            "differences for float32 data. y: the chunk in row layout [n, d] or 0 (the AVX-512 kernel's P Y\n"
            "for d >= 16 needs it when o is given). Releases the GIL.");
    mod.def("row_sqnorms", &row_sqnorms_py, py::arg("y"), py::arg("n"), py::arg("d"), py::arg("out"),
            py::arg("dtype"),
            "out[r] = ||y_r||^2 in float64 for a contiguous [n, d] array (NaN / Inf propagate). Releases the GIL.");
    mod.def("cpu_direct_reads_rows", &cpu::direct_reads_rows,
            "True when denoise_direct on float32 data reads the row layout y (yT may be 0) on this CPU.");
    mod.def("cpu_direct_kernel", &cpu::direct_kernel_name,
            "The direct kernel fp32 data runs with: 'avx512 intrinsics' or the multiversioned clone's ISA.");
    mod.def("denoise_epilogue", &denoise_epilogue_py, py::arg("S"), py::arg("M"), py::arg("n"), py::arg("ldS"),
            py::arg("a2c"), py::arg("off"), py::arg("m"), py::arg("l"), py::arg("q"), py::arg("o"), py::arg("d"),
            py::arg("nonzero_cols"), py::arg("dtype"),
            "Epilogue of the GEMM path: S [M, n] (row stride ldS) holds T = (2/alpha) x.y - ||y||^2; logits are\n"
            "a2c T + off. Overwrites S with the weights e^(z - m), updates m, l, q, rescales o (float64 [M, d] or 0)\n"
            "and flags in nonzero_cols (uint8 [n] or 0) the columns with a nonzero weight. Releases the GIL.");
    mod.def("refine_candidates", &refine_candidates_py, py::arg("T"), py::arg("M"), py::arg("n"), py::arg("ldT"),
            py::arg("x"), py::arg("Y"), py::arg("d"), py::arg("alpha"), py::arg("xx"), py::arg("lo"),
            py::arg("budget"), py::arg("shift"), py::arg("count"),
            "The GEMM path's certified refinement, in place: rows of T (float32 [M, n], row stride ldT) with at\n"
            "most budget entries >= lo[i] get those candidates' float64 difference scores and are re-based on\n"
            "their max (shift float64 [M]); count (int64 [M]) gets every row's candidate count (rows above budget\n"
            "are left untouched). Releases the GIL.");
    mod.def("sparse_pv", &sparse_pv_py, py::arg("W"), py::arg("M"), py::arg("n"), py::arg("ldW"), py::arg("Y"),
            py::arg("d"), py::arg("o"), py::arg("tail_w"), py::arg("max_nnz"),
            "o[i] += sum_j W_ij y_j (float64) over the entries >= tail_w * the row max; returns how many entries\n"
            "that used, or -1 (o untouched) when more than max_nnz. Releases the GIL.");
    mod.def("cpu_simd_level", &cpu::simd_level,
            "The instruction set the multiversioned CPU kernels use on this CPU: avx512f, avx2+fma or baseline.");
}

}  // namespace diffgen_fast
