// LayerNorm over the last dimension, forward and backward, on raw device pointers.
//
// Shapes: x, y, dy, dx are [rows, D] with unit stride along D and a row stride in elements;
// weight, bias, dweight, dbias are fp32 [D] contiguous; mean and rstd are fp32 [rows].
// Statistics and all arithmetic are fp32 whatever the storage dtypes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace dinov2_fast {

constexpr int64_t kLayerNormMaxDim = 16384;

// y = (x - mean) * rstd * weight + bias with mean and biased variance over D and
// rstd = 1 / sqrt(var + eps). weight and bias may each be null (1 and 0). mean and rstd are
// written for the backward pass (either may be null to skip it). y_dtype may differ from x_dtype
// (autocast: fp32 in, fp16/bf16 out). rows == 0 does nothing. Returns cudaErrorInvalidValue for
// D outside [1, kLayerNormMaxDim], rows < 0 or an unknown dtype, else the launch's status.
cudaError_t layer_norm_fwd(const void* x, void* y, const float* weight, const float* bias,
                           float* mean, float* rstd, int64_t rows, int64_t dim,
                           int64_t x_row_stride, int64_t y_row_stride, float eps, DType x_dtype,
                           DType y_dtype, cudaStream_t stream);

// Number P of partial rows the backward pass writes for dweight/dbias: it needs a fp32
// workspace of 2 * P * D floats. Depends only on the arguments and the SM count of `device`,
// so it is the same for every call with the same arguments on the same GPU. Always >= 1.
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t dim, DType x_dtype, int device);

// dx = rstd * (w * dy - (xhat * c1 + c2)) with xhat = (x - mean) * rstd, c1 = mean over D of
// xhat * w * dy and c2 = mean over D of w * dy (w = 1 when weight is null). dx has x's dtype,
// dy has dy_dtype. dweight = sum over rows of dy * xhat and dbias = sum over rows of dy, each
// skipped when null; they are deterministic (fixed row assignment and summation order, no
// atomics) and need `partial`, a [2, P, D] fp32 workspace with P from
// layer_norm_bwd_partial_rows(rows, dim, x_dtype, device). rows == 0 zeroes dweight and dbias.
cudaError_t layer_norm_bwd(const void* dy, const void* x, const float* weight, const float* mean,
                           const float* rstd, void* dx, float* dweight, float* dbias,
                           float* partial, int64_t rows, int64_t dim, int64_t dy_row_stride,
                           int64_t x_row_stride, int64_t dx_row_stride, DType x_dtype,
                           DType dy_dtype, int device, cudaStream_t stream);

}  // namespace dinov2_fast
