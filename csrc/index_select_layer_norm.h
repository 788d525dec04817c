// index_select_layer_norm's forward on raw device pointers: LayerNorm of the picked samples of a
// [B, N, D] tensor with the gather in the loads, also writing the gathered rows (what the
// backward keeps). The backward is layer_norm_bwd on those rows, then index_scatter_rows.
//
// Shapes: x is [B, N, D] with unit stride along D and element strides along B and N; index is
// 1-D int32 or int64 [k] with an element stride (values in [0, B)); y and x_out are [k * N, D]
// with unit stride along D and a row stride (row j * N + n is x[index[j], n]); weight and bias
// are fp32 [D] contiguous or null; mean and rstd fp32 [k * N]. Statistics and math are fp32.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"
#include "indexed_rows.h"

namespace dinov2_fast {

// y = (x[index[j], n] - mean) * rstd * weight + bias for every picked row, as layer_norm_fwd;
// x_out (x's dtype; null: not written) receives the row as read. mean and rstd may be null.
// k, N == 0 does nothing. Returns cudaErrorInvalidValue for D outside [1, kLayerNormMaxDim],
// negative sizes, a grid too large or an unknown dtype, else the launch's status.
cudaError_t index_select_layer_norm_fwd(const void* x, const void* index, IndexType index_type,
                                        int64_t index_stride, int64_t k, int64_t tokens,
                                        int64_t dim, int64_t x_stride_b, int64_t x_stride_n,
                                        void* y, int64_t y_row_stride, void* x_out,
                                        int64_t x_out_row_stride, const float* weight,
                                        const float* bias, float* mean, float* rstd, float eps,
                                        DType x_dtype, DType y_dtype, cudaStream_t stream);

}  // namespace dinov2_fast
