// Argument conversion shared by the binding files: pointers and sizes arrive as Python ints and are checked here,
// before any pointer is touched; a bad one raises ValueError (TypeError for the wrong Python type) naming it.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

namespace diffgen_fast {
namespace bind {

namespace py = pybind11;

inline std::string type_name(const py::handle& h) { return py::str(py::type::handle_of(h).attr("__name__")); }

inline bool is_int(const py::handle& h) { return PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr()); }

// A pointer passed as a Python int (tensor.data_ptr()); 0 is the null pointer.
inline std::uintptr_t as_pointer(const py::handle& h, const char* name) {
    if (!is_int(h)) {
        throw py::type_error(std::string(name) +
                             " must be a pointer given as a Python int (e.g. tensor.data_ptr()), got " + type_name(h));
    }
    int overflow = 0;
    const long long signed_value = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow < 0 || (overflow == 0 && signed_value < 0)) {
        throw py::value_error(std::string(name) + " must be a non-negative pointer value, got " +
                              std::string(py::str(h)));
    }
    const unsigned long long value = PyLong_AsUnsignedLongLong(h.ptr());
    if (PyErr_Occurred() != nullptr ||
        value > static_cast<unsigned long long>(std::numeric_limits<std::uintptr_t>::max())) {
        PyErr_Clear();
        throw py::value_error(std::string(name) + " does not fit in a pointer: " + std::string(py::str(h)));
    }
    return static_cast<std::uintptr_t>(value);
}

inline std::int64_t as_size(const py::handle& h, const char* name) {
    if (!is_int(h)) throw py::type_error(std::string(name) + " must be an int, got " + type_name(h));
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow != 0 || value < 0) {
        throw py::value_error(std::string(name) + " must be >= 0, got " + std::string(py::str(h)));
    }
    return static_cast<std::int64_t>(value);
}

inline void require_pointer(std::uintptr_t p, std::size_t align, const char* name, const char* what) {
    if (p == 0) throw py::value_error(std::string(name) + " is a null pointer (0); expected " + what);
    if (p % align != 0) {
        throw py::value_error(std::string(name) + " is not aligned to " + std::to_string(align) +
                              " bytes; expected " + what);
    }
}

}  // namespace bind

// Registration of each kernel family's functions on the module (csrc/cpu/bindings_cpu.cpp,
// csrc/cuda/bindings_cuda.cpp). CUDA ones exist only when setup.py compiled the .cu files.
void register_cpu_kernels(pybind11::module_& mod);
void register_cpu_knn(pybind11::module_& mod);  // csrc/cpu/bindings_knn.cpp
#ifdef DIFFGEN_FAST_WITH_CUDA
void register_cuda_kernels(pybind11::module_& mod);
pybind11::dict cuda_build_info();
#endif

}  // namespace diffgen_fast
