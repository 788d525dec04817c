// scaled_index_add on raw device pointers: x[index[j]] += alpha * scaling * source[j], the fused
// residual update of a block with stochastic depth, and its backward. The contract of
// kernels/scaled_index_add.py's scaled_index_add_fwd and scaled_index_add_bwd.
//
// Shapes: x, out and grad are [B, N, D], source and grad_source [k, N, D], all with unit stride
// along D and element strides along B (or k) and N (0 allowed for what is only read); index is
// 1-D int32 or int64 [k] with an element stride, values unique and in [0, B); scaling is [D]
// contiguous (float32, float16 or bfloat16) or null for 1. All math is fp32, rounded once.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"
#include "indexed_rows.h"

namespace dinov2_fast {

// Out of place: out[b] = x[b] + alpha * scaling * source[j] where index[j] == b, and out[b] =
// x[b] (the same bits) for every other b < B; every element of out is written once, and out has
// x's dtype. `workspace` holds inverse_index_workspace_size(k, B) int32 elements (null when 0).
// In place: only the k indexed samples are read from x and written to out (out == x adds into x;
// the other samples of out are not touched); no workspace.
// B, N or D == 0 (or k == 0 in place) does nothing. Returns cudaErrorInvalidValue for negative
// sizes, k > B, a grid too large or an unknown dtype, else the launch's status.
cudaError_t scaled_index_add_fwd(const void* x, void* out, const void* source,
                                 const void* scaling, const void* index, IndexType index_type,
                                 int64_t index_stride, int32_t* workspace, int64_t batch,
                                 int64_t k, int64_t tokens, int64_t dim, float alpha,
                                 int64_t x_stride_b, int64_t x_stride_n, int64_t out_stride_b,
                                 int64_t out_stride_n, int64_t source_stride_b,
                                 int64_t source_stride_n, bool inplace, DType x_dtype,
                                 DType source_dtype, DType scaling_dtype, cudaStream_t stream);

// Number P of partial rows the backward writes for grad_scaling: it needs a fp32 workspace of
// P * D floats. Depends only on the arguments and the SM count of `device`, so it is the same for
// every call with the same arguments on the same GPU. Always >= 1.
int64_t scaled_index_add_bwd_partial_rows(int64_t k, int64_t tokens, int64_t dim, int device);

// grad_source[j] = alpha * scaling * grad[index[j]] (source's dtype; skipped when null) and
// grad_scaling = alpha * sum over j, n of grad[index[j], n] * source[j, n] (scaling's dtype;
// skipped when null, needs scaling and `partial`, P * D fp32 with P from
// scaled_index_add_bwd_partial_rows). grad_scaling is deterministic: a fixed assignment of rows
// to partial rows, a fixed summation order, no atomics. source is read only for grad_scaling.
// k == 0 or N == 0 zeroes grad_scaling. Errors as scaled_index_add_fwd.
cudaError_t scaled_index_add_bwd(const void* grad, const void* source, const void* scaling,
                                 const void* index, IndexType index_type, int64_t index_stride,
                                 void* grad_source, void* grad_scaling, float* partial, int64_t k,
                                 int64_t tokens, int64_t dim, float alpha, int64_t grad_stride_b,
                                 int64_t grad_stride_n, int64_t source_stride_b,
                                 int64_t source_stride_n, int64_t grad_source_stride_b,
                                 int64_t grad_source_stride_n, DType grad_dtype,
                                 DType source_dtype, DType scaling_dtype, int device,
                                 cudaStream_t stream);

}  // namespace dinov2_fast
