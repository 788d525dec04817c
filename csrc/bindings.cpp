// dinov2_fast._C: the Python face of the torch-free CUDA launchers.
//
// Tensors arrive as device addresses (tensor.data_ptr()) and the stream as its handle
// (torch.cuda.current_stream().cuda_stream), all Python ints; dtypes arrive as DType tags
// (0 = float32, 1 = float16, 2 = bfloat16). Python validates shapes and devices. Here an unknown
// dtype tag raises ValueError before any CUDA call, and a failed launch raises RuntimeError
// "<kernel>: CUDA error: <message>". Launches run without the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "attention.h"
#include "common.h"
#include "index_select_cat.h"
#include "index_select_layer_norm.h"
#include "indexed_rows.h"
#include "layer_norm.h"
#include "scaled_index_add.h"

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

// --- attention ---------------------------------------------------------------------------------

using Strides3 = std::array<int64_t, 3>;  // (b, n, h) in elements; b = 0 for varlen tensors
using Strides2 = std::array<int64_t, 2>;  // lse / delta: (b, h)

dinov2_fast::TokenStrides token_strides(const Strides3& s) { return {s[0], s[1], s[2]}; }

dinov2_fast::AttentionShape attention_shape(const char* function, uintptr_t cu_seqlens,
                                            int64_t batch, int64_t seqlen, int64_t heads,
                                            int64_t head_dim, const Strides2& lse_strides,
                                            double scale, int64_t dtype) {
  const DType type = dtype_from_tag(dtype, function, "dtype");
  if (type == DType::kFloat32) {
    throw py::value_error(std::string(function) +
                          ": dtype must be float16 or bfloat16 (tags 1, 2), got float32");
  }
  if (!dinov2_fast::is_attention_head_dim(head_dim)) {
    throw py::value_error(std::string(function) + ": head_dim must be 32, 64, 80, 96 or 128, got " +
                          std::to_string(head_dim));
  }
  return {as_pointer<const int32_t>(cu_seqlens),
          batch,
          seqlen,
          heads,
          head_dim,
          lse_strides[0],
          lse_strides[1],
          static_cast<float>(scale),
          type};
}

void attention_fwd(uintptr_t q, const Strides3& q_strides, uintptr_t k, const Strides3& k_strides,
                   uintptr_t v, const Strides3& v_strides, uintptr_t o, const Strides3& o_strides,
                   uintptr_t lse, const Strides2& lse_strides, uintptr_t cu_seqlens, int64_t batch,
                   int64_t seqlen, int64_t heads, int64_t head_dim, double scale, int64_t dtype,
                   uintptr_t stream) {
  const auto shape = attention_shape("attention_fwd", cu_seqlens, batch, seqlen, heads, head_dim,
                                     lse_strides, scale, dtype);
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::attention_fwd(
        shape, as_pointer<const void>(q), token_strides(q_strides), as_pointer<const void>(k),
        token_strides(k_strides), as_pointer<const void>(v), token_strides(v_strides),
        as_pointer<void>(o), token_strides(o_strides), as_pointer<float>(lse), as_stream(stream));
  }
  raise_on_error(status, "attention_fwd");
}

void attention_bwd(uintptr_t d_out, const Strides3& do_strides, uintptr_t q,
                   const Strides3& q_strides, uintptr_t k, const Strides3& k_strides, uintptr_t v,
                   const Strides3& v_strides, uintptr_t o, const Strides3& o_strides,
                   uintptr_t lse, uintptr_t delta, const Strides2& lse_strides, uintptr_t dq,
                   const Strides3& dq_strides, uintptr_t dk, const Strides3& dk_strides,
                   uintptr_t dv, const Strides3& dv_strides, uintptr_t cu_seqlens, int64_t batch,
                   int64_t seqlen, int64_t heads, int64_t head_dim, double scale, int64_t dtype,
                   uintptr_t stream) {
  const auto shape = attention_shape("attention_bwd", cu_seqlens, batch, seqlen, heads, head_dim,
                                     lse_strides, scale, dtype);
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::attention_bwd(
        shape, as_pointer<const void>(d_out), token_strides(do_strides),
        as_pointer<const void>(q), token_strides(q_strides), as_pointer<const void>(k),
        token_strides(k_strides), as_pointer<const void>(v), token_strides(v_strides),
        as_pointer<const void>(o), token_strides(o_strides), as_pointer<const float>(lse),
        as_pointer<float>(delta), as_pointer<void>(dq), token_strides(dq_strides),
        as_pointer<void>(dk), token_strides(dk_strides), as_pointer<void>(dv),
        token_strides(dv_strides), as_stream(stream));
  }
  raise_on_error(status, "attention_bwd");
}

// --- stochastic depth: index_select_cat and scaled_index_add -----------------------------------

using dinov2_fast::IndexType;

IndexType index_type_from_tag(int64_t tag, const char* function) {
  if (!dinov2_fast::is_valid_index_type_tag(tag)) {
    throw py::value_error(std::string(function) + ": unknown index dtype tag " +
                          std::to_string(tag) + " for index_dtype (0 = int32, 1 = int64)");
  }
  return static_cast<IndexType>(tag);
}

int64_t inverse_index_workspace_size(int64_t k, int64_t size) {
  return dinov2_fast::inverse_index_workspace_size(k, size);
}

void index_select_rows(uintptr_t src, uintptr_t dst, uintptr_t index, int64_t index_dtype,
                       int64_t index_stride, int64_t k, int64_t tokens, int64_t dim,
                       int64_t src_stride_b, int64_t src_stride_n, int64_t dst_stride_b,
                       int64_t dst_stride_n, int64_t dtype, uintptr_t stream) {
  const IndexType index_type = index_type_from_tag(index_dtype, "index_select_rows");
  const DType type = dtype_from_tag(dtype, "index_select_rows", "dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::index_select_rows(
        as_pointer<const void>(src), as_pointer<void>(dst), as_pointer<const void>(index),
        index_type, index_stride, k, tokens, dim, src_stride_b, src_stride_n, dst_stride_b,
        dst_stride_n, type, as_stream(stream));
  }
  raise_on_error(status, "index_select_rows");
}

void index_scatter_rows(uintptr_t grad, uintptr_t dst, uintptr_t index, int64_t index_dtype,
                        int64_t index_stride, int64_t k, int64_t size, int64_t tokens,
                        int64_t dim, int64_t grad_stride_b, int64_t grad_stride_n,
                        int64_t dst_stride_b, int64_t dst_stride_n, uintptr_t workspace,
                        int64_t dtype, uintptr_t stream) {
  const IndexType index_type = index_type_from_tag(index_dtype, "index_scatter_rows");
  const DType type = dtype_from_tag(dtype, "index_scatter_rows", "dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::index_scatter_rows(
        as_pointer<const void>(grad), as_pointer<void>(dst), as_pointer<const void>(index),
        index_type, index_stride, k, size, tokens, dim, grad_stride_b, grad_stride_n,
        dst_stride_b, dst_stride_n, as_pointer<int32_t>(workspace), type, as_stream(stream));
  }
  raise_on_error(status, "index_scatter_rows");
}

void scaled_index_add_fwd(uintptr_t x, uintptr_t out, uintptr_t source, uintptr_t scaling,
                          uintptr_t index, int64_t index_dtype, int64_t index_stride,
                          uintptr_t workspace, int64_t batch, int64_t k, int64_t tokens,
                          int64_t dim, double alpha, int64_t x_stride_b, int64_t x_stride_n,
                          int64_t out_stride_b, int64_t out_stride_n, int64_t source_stride_b,
                          int64_t source_stride_n, bool inplace, int64_t x_dtype,
                          int64_t source_dtype, int64_t scaling_dtype, uintptr_t stream) {
  const char* name = "scaled_index_add_fwd";
  const IndexType index_type = index_type_from_tag(index_dtype, name);
  const DType x_type = dtype_from_tag(x_dtype, name, "x_dtype");
  const DType source_type = dtype_from_tag(source_dtype, name, "source_dtype");
  const DType scaling_type = dtype_from_tag(scaling_dtype, name, "scaling_dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::scaled_index_add_fwd(
        as_pointer<const void>(x), as_pointer<void>(out), as_pointer<const void>(source),
        as_pointer<const void>(scaling), as_pointer<const void>(index), index_type, index_stride,
        as_pointer<int32_t>(workspace), batch, k, tokens, dim, static_cast<float>(alpha),
        x_stride_b, x_stride_n, out_stride_b, out_stride_n, source_stride_b, source_stride_n,
        inplace, x_type, source_type, scaling_type, as_stream(stream));
  }
  raise_on_error(status, name);
}

int64_t scaled_index_add_bwd_partial_rows(int64_t k, int64_t tokens, int64_t dim, int device) {
  py::gil_scoped_release no_gil;
  return dinov2_fast::scaled_index_add_bwd_partial_rows(k, tokens, dim, device);
}

void scaled_index_add_bwd(uintptr_t grad, uintptr_t source, uintptr_t scaling, uintptr_t index,
                          int64_t index_dtype, int64_t index_stride, uintptr_t grad_source,
                          uintptr_t grad_scaling, uintptr_t partial, int64_t k, int64_t tokens,
                          int64_t dim, double alpha, int64_t grad_stride_b, int64_t grad_stride_n,
                          int64_t source_stride_b, int64_t source_stride_n,
                          int64_t grad_source_stride_b, int64_t grad_source_stride_n,
                          int64_t grad_dtype, int64_t source_dtype, int64_t scaling_dtype,
                          int device, uintptr_t stream) {
  const char* name = "scaled_index_add_bwd";
  const IndexType index_type = index_type_from_tag(index_dtype, name);
  const DType grad_type = dtype_from_tag(grad_dtype, name, "grad_dtype");
  const DType source_type = dtype_from_tag(source_dtype, name, "source_dtype");
  const DType scaling_type = dtype_from_tag(scaling_dtype, name, "scaling_dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::scaled_index_add_bwd(
        as_pointer<const void>(grad), as_pointer<const void>(source),
        as_pointer<const void>(scaling), as_pointer<const void>(index), index_type, index_stride,
        as_pointer<void>(grad_source), as_pointer<void>(grad_scaling), as_pointer<float>(partial),
        k, tokens, dim, static_cast<float>(alpha), grad_stride_b, grad_stride_n, source_stride_b,
        source_stride_n, grad_source_stride_b, grad_source_stride_n, grad_type, source_type,
        scaling_type, device, as_stream(stream));
  }
  raise_on_error(status, name);
}

void index_select_layer_norm_fwd(uintptr_t x, uintptr_t index, int64_t index_dtype,
                                 int64_t index_stride, int64_t k, int64_t tokens, int64_t dim,
                                 int64_t x_stride_b, int64_t x_stride_n, uintptr_t y,
                                 int64_t y_row_stride, uintptr_t x_out, int64_t x_out_row_stride,
                                 uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd,
                                 double eps, int64_t x_dtype, int64_t y_dtype, uintptr_t stream) {
  const char* name = "index_select_layer_norm_fwd";
  const IndexType index_type = index_type_from_tag(index_dtype, name);
  const DType x_type = dtype_from_tag(x_dtype, name, "x_dtype");
  const DType y_type = dtype_from_tag(y_dtype, name, "y_dtype");
  cudaError_t status;
  {
    py::gil_scoped_release no_gil;
    status = dinov2_fast::index_select_layer_norm_fwd(
        as_pointer<const void>(x), as_pointer<const void>(index), index_type, index_stride, k,
        tokens, dim, x_stride_b, x_stride_n, as_pointer<void>(y), y_row_stride,
        as_pointer<void>(x_out), x_out_row_stride, as_pointer<const float>(weight),
        as_pointer<const float>(bias), as_pointer<float>(mean), as_pointer<float>(rstd),
        static_cast<float>(eps), x_type, y_type, as_stream(stream));
  }
  raise_on_error(status, name);
}

}  // namespace

// The tests' CPU emulator builds these bindings under another module name.
#ifndef DINOV2_FAST_MODULE_NAME
#define DINOV2_FAST_MODULE_NAME _C
#endif

PYBIND11_MODULE(DINOV2_FAST_MODULE_NAME, m) {
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
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("o"),
        py::arg("o_strides"), py::arg("lse"), py::arg("lse_strides"), py::arg("cu_seqlens"),
        py::arg("batch"), py::arg("seqlen"), py::arg("heads"), py::arg("head_dim"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Attention forward (fp16/bf16): o = softmax(scale q k^T) v and fp32 lse. Tensors\n"
        "[B, N, H, D] with (b, n, h) strides, or [T, H, D] with b stride 0 and cu_seqlens (int32\n"
        "[S + 1] address; 0 for dense); lse [B, H, N] or [H, T] with (b, h) strides. seqlen is N\n"
        "or max_seqlen. q, k, v 16-byte aligned with strides multiples of 8.");
  m.def("attention_bwd", &attention_bwd, py::arg("d_out"), py::arg("do_strides"), py::arg("q"),
        py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),
        py::arg("v_strides"), py::arg("o"), py::arg("o_strides"), py::arg("lse"),
        py::arg("delta"), py::arg("lse_strides"), py::arg("dq"), py::arg("dq_strides"),
        py::arg("dk"), py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"),
        py::arg("cu_seqlens"), py::arg("batch"), py::arg("seqlen"), py::arg("heads"),
        py::arg("head_dim"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Attention backward: dq, dk, dv from d_out, q, k, v, o and lse (as attention_fwd wrote\n"
        "them). delta is an fp32 workspace shaped and strided as lse. Deterministic.");

  // --- stochastic depth ---
  m.def("inverse_index_workspace_size", &inverse_index_workspace_size, py::arg("k"),
        py::arg("size"),
        "Int32 elements of the workspace index_scatter_rows and scaled_index_add_fwd (out of\n"
        "place) need for k indices into `size` samples: 0 (pass 0) or `size`.");
  m.def("index_select_rows", &index_select_rows, py::arg("src"), py::arg("dst"), py::arg("index"),
        py::arg("index_dtype"), py::arg("index_stride"), py::arg("k"), py::arg("tokens"),
        py::arg("dim"), py::arg("src_stride_b"), py::arg("src_stride_n"), py::arg("dst_stride_b"),
        py::arg("dst_stride_n"), py::arg("dtype"), py::arg("stream"),
        "Gather: dst[j, n, :] = src[index[j], n, :] for j < k; [*, tokens, dim] tensors with\n"
        "unit stride along dim, one dtype. index_dtype: 0 int32, 1 int64.");
  m.def("index_scatter_rows", &index_scatter_rows, py::arg("grad"), py::arg("dst"),
        py::arg("index"), py::arg("index_dtype"), py::arg("index_stride"), py::arg("k"),
        py::arg("size"), py::arg("tokens"), py::arg("dim"), py::arg("grad_stride_b"),
        py::arg("grad_stride_n"), py::arg("dst_stride_b"), py::arg("dst_stride_n"),
        py::arg("workspace"), py::arg("dtype"), py::arg("stream"),
        "Scatter: dst[index[j]] = grad[j] and zero for the other samples of dst [size, tokens,\n"
        "dim]; workspace: inverse_index_workspace_size(k, size) int32 (0 when that is 0).");
  m.def("scaled_index_add_fwd", &scaled_index_add_fwd, py::arg("x"), py::arg("out"),
        py::arg("source"), py::arg("scaling"), py::arg("index"), py::arg("index_dtype"),
        py::arg("index_stride"), py::arg("workspace"), py::arg("batch"), py::arg("k"),
        py::arg("tokens"), py::arg("dim"), py::arg("alpha"), py::arg("x_stride_b"),
        py::arg("x_stride_n"), py::arg("out_stride_b"), py::arg("out_stride_n"),
        py::arg("source_stride_b"), py::arg("source_stride_n"), py::arg("inplace"),
        py::arg("x_dtype"), py::arg("source_dtype"), py::arg("scaling_dtype"), py::arg("stream"),
        "out = x with alpha * scaling * source[j] added to sample index[j] (fp32 math). Out of\n"
        "place every sample of out is written (workspace as index_scatter_rows); in place only\n"
        "the indexed ones. scaling: [dim] address or 0 for 1.");
  m.def("scaled_index_add_bwd_partial_rows", &scaled_index_add_bwd_partial_rows, py::arg("k"),
        py::arg("tokens"), py::arg("dim"), py::arg("device"),
        "Number P of grad_scaling partial rows scaled_index_add_bwd writes: it needs a fp32\n"
        "workspace of P * dim floats. The same for the same arguments on the same GPU.");
  m.def("scaled_index_add_bwd", &scaled_index_add_bwd, py::arg("grad"), py::arg("source"),
        py::arg("scaling"), py::arg("index"), py::arg("index_dtype"), py::arg("index_stride"),
        py::arg("grad_source"), py::arg("grad_scaling"), py::arg("partial"), py::arg("k"),
        py::arg("tokens"), py::arg("dim"), py::arg("alpha"), py::arg("grad_stride_b"),
        py::arg("grad_stride_n"), py::arg("source_stride_b"), py::arg("source_stride_n"),
        py::arg("grad_source_stride_b"), py::arg("grad_source_stride_n"), py::arg("grad_dtype"),
        py::arg("source_dtype"), py::arg("scaling_dtype"), py::arg("device"), py::arg("stream"),
        "grad_source = alpha * scaling * grad[index] (source's dtype; 0: skipped) and a\n"
        "deterministic grad_scaling = alpha * sum grad[index] * source (scaling's dtype; 0:\n"
        "skipped, else needs partial: P * dim fp32, P from scaled_index_add_bwd_partial_rows).");
  m.def("index_select_layer_norm_fwd", &index_select_layer_norm_fwd, py::arg("x"),
        py::arg("index"), py::arg("index_dtype"), py::arg("index_stride"), py::arg("k"),
        py::arg("tokens"), py::arg("dim"), py::arg("x_stride_b"), py::arg("x_stride_n"),
        py::arg("y"), py::arg("y_row_stride"), py::arg("x_out"), py::arg("x_out_row_stride"),
        py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("eps"),
        py::arg("x_dtype"), py::arg("y_dtype"), py::arg("stream"),
        "LayerNorm forward of the picked rows x[index[j], n] of x [B, tokens, dim], as\n"
        "layer_norm_fwd, into y[k * tokens, dim]; x_out (x's dtype, 0: skipped) gets the rows as\n"
        "read. weight and bias are fp32 [dim] or 0.");
}
