// The gathered LayerNorm forward (see index_select_layer_norm.h for the contract).
//
// Byte model: per picked row, read D elements of x once and write D of y and D of x_out (the
// gathered rows the backward keeps); the unfused pair (gather, then LayerNorm) reads the row
// twice and writes it once more. The index and the parameters stay in L1/L2.
//
// The kernel is layer_norm.cu's forward with its gather switched on (launch_layer_norm_fwd,
// layer_norm_rows.h): the same row layout, vector/scalar paths and launch shapes, with each row's
// address taken through the index and x_out written from the first pass's loads.
#include "index_select_layer_norm.h"

#include "layer_norm_rows.h"

namespace dinov2_fast {

cudaError_t index_select_layer_norm_fwd(const void* x, const void* index, IndexType index_type,
                                        int64_t index_stride, int64_t k, int64_t tokens,
                                        int64_t dim, int64_t x_stride_b, int64_t x_stride_n,
                                        void* y, int64_t y_row_stride, void* x_out,
                                        int64_t x_out_row_stride, const float* weight,
                                        const float* bias, float* mean, float* rstd, float eps,
                                        DType x_dtype, DType y_dtype, cudaStream_t stream) {
  if (k < 0 || tokens < 0) return cudaErrorInvalidValue;
  // Row j * N + n is token n of sample index[j].
  const LayerNormGather gather{IndexRef{index, index_stride, index_type == IndexType::kInt64},
                               tokens, x_stride_b, x_out, x_out_row_stride};
  return launch_layer_norm_fwd(x, y, weight, bias, mean, rstd, k * tokens, dim, x_stride_n,
                               y_row_stride, eps, &gather, x_dtype, y_dtype, stream);
}

}  // namespace dinov2_fast
