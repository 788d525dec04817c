// LayerNorm forward and backward kernels (see layer_norm.h for the contract).
//
// Row mapping, shared by forward and backward: a row belongs to threads_per_row threads (a power
// of two, at least a warp, the fewest that cover it with kElemsPerThread elements each); a block
// holds rows_per_block such row groups. Thread `lane` of a row group owns columns
// (i * threads_per_row + lane) * kVec + [0, kVec) for i < kIters, so each access is a kVec-wide
// vector and a group's accesses are coalesced. Two instantiations per dtype pair: the vector
// path (kVec = 16 bytes / sizeof(x element), needing aligned pointers and strides) and the
// scalar path (kVec = 1); kVec * kIters == kElemsPerThread in both, so the row layout, and with
// it the backward partial-row count, depends on dim only.
//
// The forward kernel also serves index_select_layer_norm_fwd (index_select_layer_norm.cu) through
// launch_layer_norm_fwd (layer_norm_rows.h): kGather = true takes each row's address through the
// index and writes the gathered row (x_out) from the first pass's loads, with its own parameter
// struct. kGather = false is the plain LayerNorm as measured on an H100, unchanged by the merge:
// the same row layout, vector/scalar paths, launch shapes, launch bounds and parameter struct,
// and the same sm_90a SASS (no index reads, no x_out branch).
#include "layer_norm.h"

#include <algorithm>
#include <type_traits>

#include "indexed_rows.h"
#include "layer_norm_rows.h"

namespace dinov2_fast {
namespace {

// 16 elements per thread: 1024 threads cover the largest row (16384).
constexpr int kElemsPerThread = 16;
// Forward blocks hold at least this many threads, packing several short rows into a block.
constexpr int kFwdMinBlockThreads = 128;
// Forward kernels for blocks of up to this many threads (rows up to 4096 elements) compile for
// more than the 64 registers per thread that 1024-thread blocks allow.
constexpr int kFwdSmallRowsBlockThreads = 256;
// Backward blocks hold at least this many threads; the grid puts 1024 threads on each SM
// (64 registers each), so P = SMs * 1024 / block threads partial rows of dweight/dbias.
constexpr int kBwdMinBlockThreads = 256;
constexpr int kBwdThreadsPerSm = 1024;
// Dynamic shared memory above this needs an opt-in per kernel.
constexpr size_t kDefaultMaxSmemBytes = 48 * 1024;
// The dweight/dbias reduction: a block sums kReduceCols columns over the P partial rows with
// kReduceSlices threads per column, each taking every kReduceSlices-th partial row.
constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;

struct RowLayout {
  int threads_per_row;
  int rows_per_block;
  int block_threads;
};

RowLayout row_layout(int64_t dim, int min_block_threads) {
  int threads_per_row = kWarpSize;
  while (static_cast<int64_t>(threads_per_row) * kElemsPerThread < dim) threads_per_row *= 2;
  const int block_threads = std::max(threads_per_row, min_block_threads);
  return {threads_per_row, block_threads / threads_per_row, block_threads};
}

// The backward kernel's dweight/dbias sums: 2 * 16 floats per thread, 32 KiB for 256 threads,
// 128 KiB for 1024 (within the 163 KiB of an A100 and 227 KiB of an H100).
size_t bwd_smem_bytes(const RowLayout& layout) {
  return 2 * sizeof(float) * kElemsPerThread * static_cast<size_t>(layout.block_threads);
}

struct FwdParams {
  const void* x;
  void* y;
  const float* weight;  // null: 1
  const float* bias;    // null: 0
  float* mean;          // null: not written
  float* rstd;          // null: not written
  int64_t rows;
  int64_t x_row_stride;  // with a gather: between the tokens of a sample
  int64_t y_row_stride;
  int dim;
  float eps;
  int threads_per_row;
  int rows_per_block;
};

struct BwdParams {
  const void* dy;
  const void* x;
  const float* weight;  // null: 1
  const float* mean;
  const float* rstd;
  void* dx;
  float* partial;  // [2][gridDim.x][dim]: dweight partial rows, then dbias partial rows
  bool write_dweight;
  bool write_dbias;
  int64_t rows;
  int64_t dy_row_stride;
  int64_t x_row_stride;
  int64_t dx_row_stride;
  int dim;
  int threads_per_row;
  int rows_per_block;
};

// Loads kVec parameter values at col, or `fill` when the parameter is absent.
template <int kVec>
__device__ __forceinline__ void load_param(const float* param, int col, float fill,
                                           float (&out)[kVec]) {
  if (param != nullptr) {
    load_as_float(param + col, out);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = fill;
  }
}

// The gathered kernel's parameters. The plain kernel takes FwdParams alone: a larger parameter
// struct by itself changes its code (and register count, 84 to 71 on some instantiations).
struct GatheredFwdParams : FwdParams, LayerNormGather {};

template <bool kGather>
using FwdKernelParams = std::conditional_t<kGather, GatheredFwdParams, FwdParams>;

// One row per row group, one row group per block tile. Two-pass statistics (mean, then the mean
// of squared deviations) rather than E[x^2] - E[x]^2, which cancels. The row slice stays in
// registers between the passes, except for long rows on the scalar path: 16 scalar loads with
// their addresses do not fit in the 64 registers of a 1024-thread block, so that case re-reads
// x (from L1/L2) in each pass. kGather: the rows of index_select_layer_norm_fwd, row j * N + n
// being token n of sample index[j], also copied to x_out as read.
template <typename TIn, typename TOut, int kVec, int kIters, bool kLargeRows, bool kGather>
__global__ void __launch_bounds__(kLargeRows ? kMaxThreadsPerBlock : kFwdSmallRowsBlockThreads)
    layer_norm_fwd_kernel(FwdKernelParams<kGather> p) {
  constexpr bool kRowInRegisters = !(kLargeRows && kVec == 1);
  constexpr int kUnroll = kRowInRegisters ? kIters : 4;
  __shared__ float reduce_smem[kMaxWarpsPerBlock];
  const int lane = threadIdx.x % p.threads_per_row;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * p.rows_per_block + threadIdx.x / p.threads_per_row;
  const bool row_valid = row < p.rows;
  const int warps_per_row = p.threads_per_row / kWarpSize;
  const float inv_dim = 1.f / static_cast<float>(p.dim);

  const TIn* x = static_cast<const TIn*>(p.x);
  TIn* x_out = nullptr;
  if constexpr (kGather) {
    if (row_valid) {
      const int64_t j = row / p.tokens;
      const int64_t n = row - j * p.tokens;
      x += p.index[j] * p.x_sample_stride + n * p.x_row_stride;
      if (p.x_out != nullptr) x_out = static_cast<TIn*>(p.x_out) + row * p.x_out_row_stride;
    }
  } else {
    x += row_valid ? row * p.x_row_stride : 0;
  }
  float row_slice[kRowInRegisters ? kIters : 1][kVec];
  // Chunk i of this thread's slice of the row, after the first pass.
  auto chunk = [&](int i, int col, float (&out)[kVec]) {
    if constexpr (kRowInRegisters) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = row_slice[i][j];
    } else {
      load_as_float(x + col, out);
    }
  };

  float sum = 0.f;
#pragma unroll kUnroll
  for (int i = 0; i < kIters; ++i) {
    const int col = (i * p.threads_per_row + lane) * kVec;
    if (row_valid && col < p.dim) {
      float v[kVec];
      if constexpr (kGather) {
        // load_as_float, keeping the raw vector for x_out.
        AlignedVec<TIn, kVec> raw;
        copy_vec(&raw, reinterpret_cast<const AlignedVec<TIn, kVec>*>(x + col));
        if (x_out != nullptr) copy_vec(reinterpret_cast<AlignedVec<TIn, kVec>*>(x_out + col), &raw);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] = to_float(raw.data[j]);
      } else {
        load_as_float(x + col, v);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sum += v[j];
        if constexpr (kRowInRegisters) row_slice[i][j] = v[j];
      }
    }
  }
  const float mean = group_reduce_sum(sum, warps_per_row, reduce_smem) * inv_dim;

  float sum_sq = 0.f;
#pragma unroll kUnroll
  for (int i = 0; i < kIters; ++i) {
    const int col = (i * p.threads_per_row + lane) * kVec;
    if (row_valid && col < p.dim) {
      float v[kVec];
      chunk(i, col, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = v[j] - mean;
        sum_sq += d * d;
      }
    }
  }
  const float var = group_reduce_sum(sum_sq, warps_per_row, reduce_smem) * inv_dim;
  const float rstd = rsqrtf(var + p.eps);

  // No block-wide synchronisation below, so rows past the end can leave.
  if (!row_valid) return;
  if (lane == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    if (p.rstd != nullptr) p.rstd[row] = rstd;
  }
  TOut* y = static_cast<TOut*>(p.y) + row * p.y_row_stride;
#pragma unroll kUnroll
  for (int i = 0; i < kIters; ++i) {
    const int col = (i * p.threads_per_row + lane) * kVec;
    if (col < p.dim) {
      float v[kVec], w[kVec], b[kVec], out[kVec];
      chunk(i, col, v);
      load_param(p.weight, col, 1.f, w);
      load_param(p.bias, col, 0.f, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = (v[j] - mean) * rstd * w[j] + b[j];
      store_from_float(y + col, out);
    }
  }
}

// Block b handles the row tiles b, b + gridDim.x, ... (a fixed assignment) and writes partial
// row b of dweight and dbias, so their bits depend only on the grid size.
//
// Each thread's dweight/dbias partial sums (2 * kElemsPerThread floats) live in shared memory,
// slot k of thread t at [k][t] so that a warp's accesses hit distinct banks: in registers they
// would leave too few for the loads in flight (two 256-thread blocks per SM instead of four).
// x and dy are read twice (pass 1: row sums and dweight/dbias; pass 2: dx) rather than kept in
// registers for the same reason; the second read hits L1/L2.
template <typename TIn, typename TGrad, int kVec, int kIters>
__global__ void __launch_bounds__(kMaxThreadsPerBlock, 1) layer_norm_bwd_kernel(BwdParams p) {
  constexpr int kElems = kIters * kVec;
  // The scalar path's 16 loads, fully unrolled and hoisted, spill at 64 registers.
  constexpr int kUnroll = kVec == 1 ? 4 : kIters;
  __shared__ float2 reduce_smem[kMaxWarpsPerBlock];
  // [2][kElems][blockDim.x]: dweight then dbias partial sums.
  DINOV2_FAST_DYNAMIC_SHARED(smem);
  float* const dwdb_smem = reinterpret_cast<float*>(smem);
  float* dw_acc = dwdb_smem + threadIdx.x;
  float* db_acc = dwdb_smem + kElems * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    dw_acc[k * blockDim.x] = 0.f;
    db_acc[k * blockDim.x] = 0.f;
  }

  const int lane = threadIdx.x % p.threads_per_row;
  const int group = threadIdx.x / p.threads_per_row;
  const int warps_per_row = p.threads_per_row / kWarpSize;
  const float inv_dim = 1.f / static_cast<float>(p.dim);
  const int64_t num_tiles = ceil_div(p.rows, p.rows_per_block);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row = tile * p.rows_per_block + group;
    const bool row_valid = row < p.rows;
    const float mean = row_valid ? p.mean[row] : 0.f;
    const float rstd = row_valid ? p.rstd[row] : 0.f;
    const TIn* x = static_cast<const TIn*>(p.x) + (row_valid ? row * p.x_row_stride : 0);
    const TGrad* dy = static_cast<const TGrad*>(p.dy) + (row_valid ? row * p.dy_row_stride : 0);

    // Pass 1: the row sums c1 and c2, and the dweight/dbias partials (mean and rstd suffice).
    float2 sums = make_float2(0.f, 0.f);
#pragma unroll kUnroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * p.threads_per_row + lane) * kVec;
      if (row_valid && col < p.dim) {
        float xv[kVec], dyv[kVec], w[kVec];
        load_as_float(x + col, xv);
        load_as_float(dy + col, dyv);
        load_param(p.weight, col, 1.f, w);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float xhat = (xv[j] - mean) * rstd;
          const float wdy = w[j] * dyv[j];
          sums.x += xhat * wdy;
          sums.y += wdy;
          dw_acc[(i * kVec + j) * blockDim.x] += dyv[j] * xhat;
          db_acc[(i * kVec + j) * blockDim.x] += dyv[j];
        }
      }
    }
    sums = group_reduce_sum(sums, warps_per_row, reduce_smem);
    const float c1 = sums.x * inv_dim;
    const float c2 = sums.y * inv_dim;

    // Pass 2: dx. Rows past the end skip it; they still join the next tile's reductions.
    if (row_valid) {
      TIn* dx = static_cast<TIn*>(p.dx) + row * p.dx_row_stride;
#pragma unroll kUnroll
      for (int i = 0; i < kIters; ++i) {
        const int col = (i * p.threads_per_row + lane) * kVec;
        if (col < p.dim) {
          float xv[kVec], dyv[kVec], w[kVec], out[kVec];
          load_as_float(x + col, xv);
          load_as_float(dy + col, dyv);
          load_param(p.weight, col, 1.f, w);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float xhat = (xv[j] - mean) * rstd;
            out[j] = rstd * (w[j] * dyv[j] - (xhat * c1 + c2));
          }
          store_from_float(dx + col, out);
        }
      }
    }
  }

  if (!p.write_dweight && !p.write_dbias) return;
  // The block's partial row: per column, the sums of its row groups in group order. Column
  // col = (i * threads_per_row + lane) * kVec + j is slot i * kVec + j of thread
  // group * threads_per_row + lane.
  __syncthreads();
  float* dw_partial = p.partial + static_cast<int64_t>(blockIdx.x) * p.dim;
  float* db_partial = p.partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * p.dim;
  const float* dw_sums = dwdb_smem;
  const float* db_sums = dwdb_smem + kElems * blockDim.x;
  for (int col = threadIdx.x; col < p.dim; col += blockDim.x) {
    const int vec = col / kVec;
    const int slot = (vec / p.threads_per_row) * kVec + col % kVec;
    const int owner = vec % p.threads_per_row;
    float dw = 0.f;
    float db = 0.f;
    for (int g = 0; g < p.rows_per_block; ++g) {
      const int index = slot * blockDim.x + g * p.threads_per_row + owner;
      dw += dw_sums[index];
      db += db_sums[index];
    }
    if (p.write_dweight) dw_partial[col] = dw;
    if (p.write_dbias) db_partial[col] = db;
  }
}

// dweight (blockIdx.y == 0) or dbias (blockIdx.y == 1) = sum of the P partial rows, per column,
// in a fixed order: each slice sums its rows in increasing order, then the slices in order.
__global__ void __launch_bounds__(kReduceCols * kReduceSlices)
    layer_norm_bwd_dwdb_reduce_kernel(const float* partial, int num_partial_rows, int dim,
                                      float* dweight, float* dbias) {
  __shared__ float slice_sums[kReduceSlices][kReduceCols];
  float* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // the same for the whole block
  const float* rows = partial + static_cast<int64_t>(blockIdx.y) * num_partial_rows * dim;
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
  float sum = 0.f;
  if (col < dim) {
#pragma unroll 4
    for (int r = threadIdx.y; r < num_partial_rows; r += kReduceSlices) {
      sum += rows[static_cast<int64_t>(r) * dim + col];
    }
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < dim) {
    float total = slice_sums[0][threadIdx.x];
    for (int s = 1; s < kReduceSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[col] = total;
  }
}

template <typename TIn, typename TOut, int kVec, bool kLargeRows, bool kGather>
cudaError_t launch_fwd_kernel(const FwdKernelParams<kGather>& p, const RowLayout& layout,
                              cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(ceil_div(p.rows, layout.rows_per_block));
  const auto kernel =
      layer_norm_fwd_kernel<TIn, TOut, kVec, kElemsPerThread / kVec, kLargeRows, kGather>;
  return launch_kernel(kernel, blocks, layout.block_threads, 0, stream, p);
}

template <typename TIn, typename TOut, bool kGather>
cudaError_t launch_fwd(const FwdKernelParams<kGather>& p, const RowLayout& layout,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TIn);
  bool vectorized = p.dim % kVec == 0 && vector_access_ok<TIn, kVec>(p.x, p.x_row_stride) &&
                    vector_access_ok<TOut, kVec>(p.y, p.y_row_stride) &&
                    vector_access_ok<float, kVec>(p.weight) &&
                    vector_access_ok<float, kVec>(p.bias);
  if constexpr (kGather) {
    vectorized = vectorized && p.x_sample_stride % kVec == 0 &&
                 vector_access_ok<TIn, kVec>(p.x_out, p.x_out_row_stride);
  }
  const bool large_rows = layout.block_threads > kFwdSmallRowsBlockThreads;
  if (vectorized) {
    return large_rows ? launch_fwd_kernel<TIn, TOut, kVec, true, kGather>(p, layout, stream)
                      : launch_fwd_kernel<TIn, TOut, kVec, false, kGather>(p, layout, stream);
  }
  return large_rows ? launch_fwd_kernel<TIn, TOut, 1, true, kGather>(p, layout, stream)
                    : launch_fwd_kernel<TIn, TOut, 1, false, kGather>(p, layout, stream);
}

template <typename TIn, typename TGrad>
cudaError_t launch_bwd(const BwdParams& p, const RowLayout& layout, int64_t num_partial_rows,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TIn);
  const bool vectorized =
      p.dim % kVec == 0 && vector_access_ok<TIn, kVec>(p.x, p.x_row_stride) &&
      vector_access_ok<TGrad, kVec>(p.dy, p.dy_row_stride) &&
      vector_access_ok<TIn, kVec>(p.dx, p.dx_row_stride) && vector_access_ok<float, kVec>(p.weight);
  const auto kernel = vectorized ? layer_norm_bwd_kernel<TIn, TGrad, kVec, kElemsPerThread / kVec>
                                 : layer_norm_bwd_kernel<TIn, TGrad, 1, kElemsPerThread>;
  const size_t smem_bytes = bwd_smem_bytes(layout);
  if (smem_bytes > kDefaultMaxSmemBytes) {
    DINOV2_FAST_CHECK_CUDA(set_max_dynamic_shared_memory(kernel, smem_bytes));
  }
  return launch_kernel(kernel, static_cast<unsigned int>(num_partial_rows), layout.block_threads,
                       smem_bytes, stream, p);
}

}  // namespace

cudaError_t launch_layer_norm_fwd(const void* x, void* y, const float* weight, const float* bias,
                                  float* mean, float* rstd, int64_t rows, int64_t dim,
                                  int64_t x_row_stride, int64_t y_row_stride, float eps,
                                  const LayerNormGather* gather, DType x_dtype, DType y_dtype,
                                  cudaStream_t stream) {
  if (dim < 1 || dim > kLayerNormMaxDim || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const RowLayout layout = row_layout(dim, kFwdMinBlockThreads);
  if (ceil_div(rows, layout.rows_per_block) > INT32_MAX) return cudaErrorInvalidValue;
  const FwdParams p{x,
                    y,
                    weight,
                    bias,
                    mean,
                    rstd,
                    rows,
                    x_row_stride,
                    y_row_stride,
                    static_cast<int>(dim),
                    eps,
                    layout.threads_per_row,
                    layout.rows_per_block};
  cudaError_t status = cudaErrorInvalidValue;
  if (gather == nullptr) {
    DINOV2_FAST_DTYPE_SWITCH(
        x_dtype, TIn,
        DINOV2_FAST_DTYPE_SWITCH(y_dtype, TOut,
                                 status = launch_fwd<TIn, TOut, false>(p, layout, stream)))
  } else {
    const GatheredFwdParams gathered{p, *gather};
    DINOV2_FAST_DTYPE_SWITCH(
        x_dtype, TIn,
        DINOV2_FAST_DTYPE_SWITCH(y_dtype, TOut,
                                 status = launch_fwd<TIn, TOut, true>(gathered, layout, stream)))
  }
  return status;
}

cudaError_t layer_norm_fwd(const void* x, void* y, const float* weight, const float* bias,
                           float* mean, float* rstd, int64_t rows, int64_t dim,
                           int64_t x_row_stride, int64_t y_row_stride, float eps, DType x_dtype,
                           DType y_dtype, cudaStream_t stream) {
  return launch_layer_norm_fwd(x, y, weight, bias, mean, rstd, rows, dim, x_row_stride,
                               y_row_stride, eps, nullptr, x_dtype, y_dtype, stream);
}

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t dim, DType /*x_dtype*/, int device) {
  // The row layout depends on dim only (both vector widths hold kElemsPerThread elements), so
  // the x dtype does not enter the count.
  if (rows < 1 || dim < 1 || dim > kLayerNormMaxDim) return 1;
  const int sm_count = sm_count_or_default(device);
  const RowLayout layout = row_layout(dim, kBwdMinBlockThreads);
  return std::min(ceil_div(rows, layout.rows_per_block),
                  static_cast<int64_t>(sm_count) * (kBwdThreadsPerSm / layout.block_threads));
}

cudaError_t layer_norm_bwd(const void* dy, const void* x, const float* weight, const float* mean,
                           const float* rstd, void* dx, float* dweight, float* dbias,
                           float* partial, int64_t rows, int64_t dim, int64_t dy_row_stride,
                           int64_t x_row_stride, int64_t dx_row_stride, DType x_dtype,
                           DType dy_dtype, int device, cudaStream_t stream) {
  if (dim < 1 || dim > kLayerNormMaxDim || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) {
    // A sum over no rows is zero.
    if (dweight != nullptr) {
      DINOV2_FAST_CHECK_CUDA(cudaMemsetAsync(dweight, 0, dim * sizeof(float), stream));
    }
    if (dbias != nullptr) {
      DINOV2_FAST_CHECK_CUDA(cudaMemsetAsync(dbias, 0, dim * sizeof(float), stream));
    }
    return cudaSuccess;
  }
  const bool need_dwdb = dweight != nullptr || dbias != nullptr;
  if (need_dwdb && partial == nullptr) return cudaErrorInvalidValue;

  const RowLayout layout = row_layout(dim, kBwdMinBlockThreads);
  const int64_t num_partial_rows = layer_norm_bwd_partial_rows(rows, dim, x_dtype, device);
  const BwdParams p{dy,
                    x,
                    weight,
                    mean,
                    rstd,
                    dx,
                    need_dwdb ? partial : nullptr,
                    dweight != nullptr,
                    dbias != nullptr,
                    rows,
                    dy_row_stride,
                    x_row_stride,
                    dx_row_stride,
                    static_cast<int>(dim),
                    layout.threads_per_row,
                    layout.rows_per_block};
  cudaError_t status = cudaErrorInvalidValue;
  DINOV2_FAST_DTYPE_SWITCH(
      x_dtype, TIn,
      DINOV2_FAST_DTYPE_SWITCH(dy_dtype, TGrad,
                               status = launch_bwd<TIn, TGrad>(p, layout, num_partial_rows,
                                                               stream)))
  DINOV2_FAST_CHECK_CUDA(status);
  if (!need_dwdb) return cudaSuccess;

  const dim3 grid(static_cast<unsigned int>(ceil_div(dim, kReduceCols)), 2);
  const dim3 block(kReduceCols, kReduceSlices);
  return launch_kernel(layer_norm_bwd_dwdb_reduce_kernel, grid, block, 0, stream, partial,
                       static_cast<int>(num_partial_rows), static_cast<int>(dim), dweight, dbias);
}

}  // namespace dinov2_fast
