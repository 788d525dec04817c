// The LayerNorm forward over rows that may be gathered: the one forward kernel (layer_norm.cu)
// behind both layer_norm_fwd and index_select_layer_norm_fwd (index_select_layer_norm.cu).
// For .cu files only: IndexRef is device code.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"
#include "indexed_rows.h"

namespace dinov2_fast {

// A gather in the loads: row r of the forward is token n = r % tokens of sample
// j = r / tokens of x, at x + index[j] * x_sample_stride + n * x_row_stride (in elements), and
// x_out (x's dtype, if not null) receives it as read.
struct LayerNormGather {
  IndexRef index;
  int64_t tokens;
  int64_t x_sample_stride;
  void* x_out;  // null: not written
  int64_t x_out_row_stride;
};

// layer_norm_fwd (same arguments, checks and results), with row r of x taken through `gather`
// unless it is null.
cudaError_t launch_layer_norm_fwd(const void* x, void* y, const float* weight, const float* bias,
                                  float* mean, float* rstd, int64_t rows, int64_t dim,
                                  int64_t x_row_stride, int64_t y_row_stride, float eps,
                                  const LayerNormGather* gather, DType x_dtype, DType y_dtype,
                                  cudaStream_t stream);

}  // namespace dinov2_fast
