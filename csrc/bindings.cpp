// dinov2_fast._C: the Python face of the torch-free CUDA launchers.
//
// Tensors arrive as device addresses (tensor.data_ptr()) and the stream as its handle
// (torch.cuda.current_stream().cuda_stream), all Python ints; dtypes arrive as DType tags
// (0 = float32, 1 = float16, 2 = bfloat16). Python validates shapes and devices. Here an unknown
// dtype tag raises ValueError before any CUDA call, and a failed launch raises RuntimeError
// "<kernel>: CUDA error: <message>". Launches run without the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "common.h"
#include "layer_norm.h"

namespace py = pybind11;

namespace {

using dinov2_fast::DType;

DType dtype_from_tag(int64_t tag, const char* function, const char* argument) {
  if (!dinov2_fast::is_valid_dtype_tag(tag)) {
    throw py::value_error(std::string(function) + ": unknown dtype tag " + std::to_string(tag) +
                          " for " + argument + " (0 = float32, 1 = float16, 2 = bfloat16)");
  }
  return static_cast<DType>(tag);
}

void raise_on_error(cudaError_t status, const char* kernel) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + ": CUDA error: " + cudaGetErrorString(status));
  }
}

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void layer_norm_fwd(uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t mean,
                    uintptr_t rstd, int64_t rows, int64_t dim, int64_t x_row_stride,
                    int64_t y_row_stride, double eps, int64_t x_dtype, int64_t y_dtype,
                    uintptr_t stream) {
  const DType x_type = dtype_from_tag(x_dtype, "layer_norm_fwd", "x_dtype");
  const DType y_type = dtype_from_tag(y_dtype, "layer_norm_fwd", "y_dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::layer_norm_fwd(
        as_pointer<const void>(x), as_pointer<void>(y), as_pointer<const float>(weight),
        as_pointer<const float>(bias), as_pointer<float>(mean), as_pointer<float>(rstd), rows,
        dim, x_row_stride, y_row_stride, static_cast<float>(eps), x_type, y_type,
        as_stream(stream));
  }
  raise_on_error(status, "layer_norm_fwd");
}

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t dim, int64_t x_dtype, int device) {
  const DType x_type = dtype_from_tag(x_dtype, "layer_norm_bwd_partial_rows", "x_dtype");
  py::gil_scoped_release no_gil;
  return dinov2_fast::layer_norm_bwd_partial_rows(rows, dim, x_type, device);
}

void layer_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t mean, uintptr_t rstd,
                    uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t partial,
                    int64_t rows, int64_t dim, int64_t dy_row_stride, int64_t x_row_stride,
                    int64_t dx_row_stride, int64_t x_dtype, int64_t dy_dtype, int device,
                    uintptr_t stream) {
  const DType x_type = dtype_from_tag(x_dtype, "layer_norm_bwd", "x_dtype");
  const DType dy_type = dtype_from_tag(dy_dtype, "layer_norm_bwd", "dy_dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::layer_norm_bwd(
        as_pointer<const void>(dy), as_pointer<const void>(x), as_pointer<const float>(weight),
        as_pointer<const float>(mean), as_pointer<const float>(rstd), as_pointer<void>(dx),
        as_pointer<float>(dweight), as_pointer<float>(dbias), as_pointer<float>(partial), rows,
        dim, dy_row_stride, x_row_stride, dx_row_stride, x_type, dy_type, device,
        as_stream(stream));
  }
  raise_on_error(status, "layer_norm_bwd");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dinov2_fast CUDA kernels: torch-free launchers on raw device pointers";

  m.def("layer_norm_fwd", &layer_norm_fwd, py::arg("x"), py::arg("y"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("dim"),
        py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("eps"), py::arg("x_dtype"),
        py::arg("y_dtype"), py::arg("stream"),
        "LayerNorm forward: y[rows, dim] = (x - mean) * rstd * weight + bias, also writing fp32\n"
        "mean[rows] and rstd[rows]. weight and bias are fp32 [dim] or 0 (absent). Pointers and\n"
        "the stream are ints; dtypes are tags (0 float32, 1 float16, 2 bfloat16).");
  m.def("layer_norm_bwd_partial_rows", &layer_norm_bwd_partial_rows, py::arg("rows"),
        py::arg("dim"), py::arg("x_dtype"), py::arg("device"),
        "Number P of dweight/dbias partial rows layer_norm_bwd writes: it needs a fp32 workspace\n"
        "of 2 * P * dim floats. The same for the same arguments on the same GPU.");
  m.def("layer_norm_bwd", &layer_norm_bwd, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        py::arg("partial"), py::arg("rows"), py::arg("dim"), py::arg("dy_row_stride"),
        py::arg("x_row_stride"), py::arg("dx_row_stride"), py::arg("x_dtype"),
        py::arg("dy_dtype"), py::arg("device"), py::arg("stream"),
        "LayerNorm backward: dx[rows, dim] (x's dtype) and, when their pointers are not 0,\n"
        "deterministic fp32 dweight[dim] and dbias[dim], using `partial` (2 * P * dim fp32,\n"
        "P from layer_norm_bwd_partial_rows; 0 when both are absent).");
}
