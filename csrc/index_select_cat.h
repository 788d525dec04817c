// index_select_cat on raw device pointers: the gather of picked samples into the flat buffer
// (forward) and the scatter of its gradient with zeros for the samples not picked (backward).
// The contract of kernels/index_select_cat.py's index_select_rows and index_scatter_rows.
//
// Shapes: sample tensors [samples, N, D] with unit stride along D and element strides along the
// samples and N (any, 0 included for a source); `index` is 1-D int32 or int64 with an element
// stride. Both tensors have one dtype (a copy moves bits; the dtype only gives the element size).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"
#include "indexed_rows.h"

namespace dinov2_fast {

// dst[j, n, :] = src[index[j], n, :] for j < k. Index values must lie in [0, B) of src.
// k, N or D == 0 does nothing. Returns cudaErrorInvalidValue for negative sizes, a grid too
// large or an unknown dtype, else the launch's status.
cudaError_t index_select_rows(const void* src, void* dst, const void* index, IndexType index_type,
                              int64_t index_stride, int64_t k, int64_t tokens, int64_t dim,
                              int64_t src_stride_b, int64_t src_stride_n, int64_t dst_stride_b,
                              int64_t dst_stride_n, DType dtype, cudaStream_t stream);

// dst[b, n, :] = grad[j, n, :] where index[j] == b, and 0 for every b < size not in index; every
// element of dst is written once. Index values must be unique and lie in [0, size).
// `workspace` holds inverse_index_workspace_size(k, size) int32 elements (may be null when that
// is 0). size, N or D == 0 does nothing. Errors as index_select_rows.
cudaError_t index_scatter_rows(const void* grad, void* dst, const void* index,
                               IndexType index_type, int64_t index_stride, int64_t k, int64_t size,
                               int64_t tokens, int64_t dim, int64_t grad_stride_b,
                               int64_t grad_stride_n, int64_t dst_stride_b, int64_t dst_stride_n,
                               int32_t* workspace, DType dtype, cudaStream_t stream);

}  // namespace dinov2_fast
