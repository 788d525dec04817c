// The shared launchers of indexed_rows.h: the inverse index and the fixed-order sum of partial
// rows. Both move little (batch-sized indices, a few hundred partial rows): they are shaped for
// one launch and a fixed summation order, not for bandwidth.
#include "indexed_rows.h"

namespace dinov2_fast {
namespace {

constexpr int kInverseThreads = 1024;
// sum_partial_rows: a block sums kReduceCols columns over the partial rows with kReduceSlices
// threads per column, each taking every kReduceSlices-th row (32 columns: one 128-byte line).
constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;

// One block: writes -1 everywhere, then the partners. __syncthreads makes the block's global
// writes visible to the whole block, so the two phases need no second launch.
__global__ void __launch_bounds__(kInverseThreads)
    inverse_index_kernel(IndexRef index, int64_t k, int64_t size, int32_t* inv) {
  for (int64_t s = threadIdx.x; s < size; s += blockDim.x) inv[s] = -1;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) inv[index[j]] = static_cast<int32_t>(j);
}

// Each slice sums its rows in increasing order, then slice 0 sums the slices in order.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceSlices)
    sum_partial_rows_kernel(const float* partial, int64_t num_rows, int64_t dim, T* out) {
  __shared__ float slice_sums[kReduceSlices][kReduceCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float sum = 0.f;
  if (col < dim) {
    for (int64_t r = threadIdx.y; r < num_rows; r += kReduceSlices) sum += partial[r * dim + col];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < dim) {
    float total = slice_sums[0][threadIdx.x];
    for (int s = 1; s < kReduceSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

}  // namespace

int sm_count_or_default(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      count < 1) {
    // Clear the error so that the next launch check does not report it.
    (void)cudaGetLastError();
    count = kDefaultSmCount;
  }
  return count;
}

cudaError_t inverse_index(const void* index, IndexType index_type, int64_t index_stride,
                          int64_t k, int64_t size, int32_t* inv, cudaStream_t stream) {
  if (k < 0 || size < 0 || k > size || size > INT32_MAX) return cudaErrorInvalidValue;
  if (size == 0) return cudaSuccess;
  const IndexRef ref{index, index_stride, index_type == IndexType::kInt64};
  return launch_kernel(inverse_index_kernel, dim3(1), dim3(kInverseThreads), 0, stream, ref, k,
                       size, inv);
}

cudaError_t sum_partial_rows(const float* partial, int64_t num_rows, int64_t dim, void* out,
                             DType out_dtype, cudaStream_t stream) {
  if (num_rows < 0 || dim < 0 || ceil_div(dim, kReduceCols) > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (dim == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(ceil_div(dim, kReduceCols)));
  const dim3 block(kReduceCols, kReduceSlices);
  DINOV2_FAST_DTYPE_SWITCH(out_dtype, T,
                           return launch_kernel(sum_partial_rows_kernel<T>, grid, block, 0, stream,
                                                partial, num_rows, dim, static_cast<T*>(out)))
  return cudaErrorInvalidValue;
}

}  // namespace dinov2_fast
