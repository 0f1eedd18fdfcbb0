// Runtime queries for diffgen_fast._C.build_info(): they work, and return an error text instead of throwing, on a
// machine with no GPU or no driver (cudart is linked statically and loads libcuda lazily).
#include <cuda_runtime.h>

#include <string>

#include "kernels.h"

namespace diffgen_fast {
namespace cuda {
namespace {

void describe(cudaError_t err, std::string* error) {
    if (error != nullptr) *error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state so later calls start clean
}

}  // namespace

int runtime_version(std::string* error) {
    int v = 0;
    const cudaError_t err = cudaRuntimeGetVersion(&v);
    if (err != cudaSuccess) describe(err, error);
    return v;
}

int driver_version(std::string* error) {
    int v = 0;
    const cudaError_t err = cudaDriverGetVersion(&v);
    if (err != cudaSuccess) {
        describe(err, error);
    } else if (v == 0 && error != nullptr) {
        *error = "no CUDA driver is installed (cudaDriverGetVersion returned 0)";
    }
    return v;
}

int device_count(std::string* error) {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        describe(err, error);
        return -1;
    }
    return n;
}

}  // namespace cuda
}  // namespace diffgen_fast
