// scaled_index_add's forward and backward kernels (see scaled_index_add.h for the contract).
//
// Byte model, with e_x, e_s the element sizes of x and source and R = N * D:
//   forward, out of place: read B * R * e_x + k * R * e_s, write B * R * e_x (the unpicked samples
//     are copied in the same pass: no separate clone, multiply, scatter and add);
//   forward, in place: read k * R * (e_x + e_s), write k * R * e_x;
//   backward: read k * R * e_x of the gradient (gathered) and, for grad_scaling, k * R * e_s of
//     source; write k * R * e_s of grad_source; the partial rows (P * D fp32, P ~ 4 per SM) and
//     the index stay in L2.
// So each kernel's floor is the copy time of those bytes; the target is >= 80% of the copy
// bandwidth (2.4 TB/s on an H100).
//
// Launch shape (indexed_rows.h): 256-thread blocks over tiles of 4 row iterations; each thread
// loads x and source (or grad and source) for all 4 rows before it stores anything: 8 to 16
// vectors of 16 bytes in flight per thread. Vectors are 16 bytes of the narrower dtype (8
// elements when either is 16-bit: an fp32 x then moves two 16-byte words per vector). At 3 to 4
// resident blocks per SM (~64 registers) that is >= 96 KiB in flight per SM against the ~23 KiB
// Little's law asks at 3 TB/s and ~1 us over 132 SMs. Out of place, a tile finds which source
// sample (if any) each of its rows takes by scanning the index once into shared memory (k <= 512;
// larger k use a one-block inverse-index kernel first), so the update is one launch. The backward
// walks the gathered rows with a fixed grid of P = min(row tiles, 4 * SMs / column tiles) blocks
// that each keep per-column sums in registers, then write one partial row; a second small kernel
// sums the P rows in a fixed order (deterministic, no atomics, as layer_norm.cu's dweight).
// Scaling is read once per thread (its columns do not change with the row), in its own dtype.
#include "scaled_index_add.h"

namespace dinov2_fast {
namespace {

// Backward blocks per SM when grad_scaling is reduced: enough to cover the memory latency, few
// enough that the partial rows (P * D fp32, written and read once) stay small next to the data.
constexpr int kBwdBlocksPerSm = 4;

struct FwdParams {
  const void* x;
  void* out;
  const void* source;
  const void* scaling;  // null: 1
  DType scaling_dtype;
  IndexRef index;
  // Out of place: the inverse index (global workspace, or null to scan the index per tile).
  const int32_t* inverse;
  bool inplace;
  int64_t k;
  int64_t rows;  // out of place: B * N (rows walk x); in place: k * N (rows walk source)
  int64_t tokens;
  int64_t dim;
  float alpha;
  int64_t x_stride_b;
  int64_t x_stride_n;
  int64_t out_stride_b;
  int64_t out_stride_n;
  int64_t source_stride_b;
  int64_t source_stride_n;
  int threads_per_row;
  int rows_per_iter;
  int tile_cols;
};

struct BwdParams {
  const void* grad;
  const void* source;
  const void* scaling;  // null: 1
  DType scaling_dtype;
  IndexRef index;
  void* grad_source;  // null: not written
  float* partial;     // null: no grad_scaling; else [gridDim.x][dim]
  int64_t rows;       // k * N: rows walk source
  int64_t row_tiles;
  int64_t tokens;
  int64_t dim;
  float alpha;
  int64_t grad_stride_b;
  int64_t grad_stride_n;
  int64_t source_stride_b;
  int64_t source_stride_n;
  int64_t grad_source_stride_b;
  int64_t grad_source_stride_n;
  int threads_per_row;
  int rows_per_iter;
  int tile_cols;
};

// alpha * scaling at the columns this thread owns (zero past the end of the row).
template <int kChunks, int kVec>
__device__ __forceinline__ void load_factor(const void* scaling, DType scaling_dtype, float alpha,
                                            int64_t col0, int threads_per_row, int lane,
                                            int64_t dim, float (&factor)[kChunks][kVec]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t col = col0 + (c * threads_per_row + lane) * kVec + e;
      float scale = 1.f;
      if (scaling != nullptr && col < dim) scale = load_float(scaling, scaling_dtype, col);
      factor[c][e] = alpha * scale;
    }
  }
}

template <typename TX, typename TS, int kVec>
__global__ void __launch_bounds__(kTileThreads) scaled_index_add_fwd_kernel(FwdParams p) {
  constexpr int kChunks = kColsPerThread / kVec;
  __shared__ int32_t slots[kMaxTileRows];
  const int64_t tile = blockIdx.x;
  TileInverse inverse{p.inverse, slots, 0};
  if (!p.inplace) {
    int64_t first, count;
    tile_samples(tile, p.rows_per_iter, p.rows, p.tokens, &first, &count);
    inverse = tile_inverse(p.index, p.k, p.inverse, first, count, slots);
  }
  const int group = threadIdx.x / p.threads_per_row;
  const int lane = threadIdx.x % p.threads_per_row;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * p.tile_cols;
  const TX* x = static_cast<const TX*>(p.x);
  const TS* source = static_cast<const TS*>(p.source);
  TX* out = static_cast<TX*>(p.out);

  float factor[kChunks][kVec];
  load_factor(p.scaling, p.scaling_dtype, p.alpha, col0, p.threads_per_row, lane, p.dim, factor);

  AlignedVec<TX, kVec> x_values[kRowIters][kChunks];
  AlignedVec<TS, kVec> source_values[kRowIters][kChunks];
  int64_t out_offset[kRowIters];
  bool add[kRowIters];
#pragma unroll
  for (int i = 0; i < kRowIters; ++i) {
    const int64_t row = (tile * kRowIters + i) * p.rows_per_iter + group;
    out_offset[i] = -1;
    add[i] = false;
    if (row >= p.rows) continue;
    const int64_t outer = row / p.tokens;
    const int64_t n = row - outer * p.tokens;
    // In place, rows walk the source and only the indexed samples are touched; out of place,
    // rows walk x and every sample is written once.
    const int64_t b = p.inplace ? p.index[outer] : outer;
    const int64_t j = p.inplace ? outer : inverse[outer];
    out_offset[i] = b * p.out_stride_b + n * p.out_stride_n;
    add[i] = j >= 0;
    const TX* x_row = x + b * p.x_stride_b + n * p.x_stride_n;
    const TS* source_row = source + (add[i] ? j * p.source_stride_b + n * p.source_stride_n : 0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
      if (col >= p.dim) continue;
      copy_vec(&x_values[i][c], reinterpret_cast<const AlignedVec<TX, kVec>*>(x_row + col));
      if (add[i]) {
        copy_vec(&source_values[i][c],
                 reinterpret_cast<const AlignedVec<TS, kVec>*>(source_row + col));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowIters; ++i) {
    if (out_offset[i] < 0) continue;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
      if (col >= p.dim) continue;
      auto* dst = reinterpret_cast<AlignedVec<TX, kVec>*>(out + out_offset[i] + col);
      if (add[i]) {
        AlignedVec<TX, kVec> y;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          y.data[e] = from_float<TX>(to_float(x_values[i][c].data[e]) +
                                     factor[c][e] * to_float(source_values[i][c].data[e]));
        }
        copy_vec(dst, &y);
      } else {
        // A row without a source keeps x's bits exactly (x + 0 would turn -0.0 into +0.0).
        copy_vec(dst, &x_values[i][c]);
      }
    }
  }
}

template <typename TG, typename TS, int kVec>
__global__ void __launch_bounds__(kTileThreads) scaled_index_add_bwd_kernel(BwdParams p) {
  constexpr int kChunks = kColsPerThread / kVec;
  // [rows_per_iter][tile_cols] per-column sums of the row groups (rows_per_iter * tile_cols =
  // kColsPerThread * block threads).
  __shared__ float col_sums[kColsPerThread * kTileThreads];
  const int group = threadIdx.x / p.threads_per_row;
  const int lane = threadIdx.x % p.threads_per_row;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * p.tile_cols;
  const TG* grad = static_cast<const TG*>(p.grad);
  const TS* source = static_cast<const TS*>(p.source);
  TS* grad_source = static_cast<TS*>(p.grad_source);
  const bool need_sums = p.partial != nullptr;

  float factor[kChunks][kVec];
  load_factor(p.scaling, p.scaling_dtype, p.alpha, col0, p.threads_per_row, lane, p.dim, factor);
  float acc[kChunks][kVec];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[c][e] = 0.f;
  }

  // Block b walks the row tiles b, b + gridDim.x, ...: a fixed assignment, so partial row b's
  // bits depend only on the grid size.
  for (int64_t tile = blockIdx.x; tile < p.row_tiles; tile += gridDim.x) {
    AlignedVec<TG, kVec> grad_values[kRowIters][kChunks];
    AlignedVec<TS, kVec> source_values[kRowIters][kChunks];
    int64_t grad_source_offset[kRowIters];
#pragma unroll
    for (int i = 0; i < kRowIters; ++i) {
      const int64_t row = (tile * kRowIters + i) * p.rows_per_iter + group;
      grad_source_offset[i] = -1;
      if (row >= p.rows) continue;
      const int64_t j = row / p.tokens;
      const int64_t n = row - j * p.tokens;
      const int64_t b = p.index[j];
      grad_source_offset[i] = j * p.grad_source_stride_b + n * p.grad_source_stride_n;
      const TG* grad_row = grad + b * p.grad_stride_b + n * p.grad_stride_n;
      const TS* source_row = source + j * p.source_stride_b + n * p.source_stride_n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
        if (col >= p.dim) continue;
        copy_vec(&grad_values[i][c], reinterpret_cast<const AlignedVec<TG, kVec>*>(grad_row + col));
        if (need_sums) {
          copy_vec(&source_values[i][c],
                   reinterpret_cast<const AlignedVec<TS, kVec>*>(source_row + col));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowIters; ++i) {
      if (grad_source_offset[i] < 0) continue;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
        if (col >= p.dim) continue;
        if (grad_source != nullptr) {
          AlignedVec<TS, kVec> y;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            y.data[e] = from_float<TS>(factor[c][e] * to_float(grad_values[i][c].data[e]));
          }
          copy_vec(reinterpret_cast<AlignedVec<TS, kVec>*>(grad_source + grad_source_offset[i] +
                                                           col),
                   &y);
        }
        if (need_sums) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[c][e] += to_float(grad_values[i][c].data[e]) *
                         to_float(source_values[i][c].data[e]);
          }
        }
      }
    }
  }

  if (!need_sums) return;  // the same for the whole block
  // The block's partial row: per column, the row groups' sums in group order, times alpha.
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      col_sums[group * p.tile_cols + (c * p.threads_per_row + lane) * kVec + e] = acc[c][e];
    }
  }
  __syncthreads();
  float* partial_row = p.partial + static_cast<int64_t>(blockIdx.x) * p.dim;
  for (int local = threadIdx.x; local < p.tile_cols; local += blockDim.x) {
    const int64_t col = col0 + local;
    if (col >= p.dim) continue;
    float total = col_sums[local];
    for (int g = 1; g < p.rows_per_iter; ++g) total += col_sums[g * p.tile_cols + local];
    partial_row[col] = total * p.alpha;
  }
}

template <typename T>
constexpr int min_size(int other) {
  return static_cast<int>(sizeof(T)) < other ? static_cast<int>(sizeof(T)) : other;
}

template <typename TX, typename TS>
cudaError_t launch_fwd(const FwdParams& p, const RowTiles& tiles, cudaStream_t stream) {
  // 16 bytes of the narrower dtype: an fp32 x with a bf16 source moves 8 elements per vector.
  constexpr int kVec = 16 / min_size<TX>(sizeof(TS));
  const bool vectorized =
      p.dim % kVec == 0 && vector_access_ok<TX, kVec>(p.x, p.x_stride_b, p.x_stride_n) &&
      vector_access_ok<TX, kVec>(p.out, p.out_stride_b, p.out_stride_n) &&
      vector_access_ok<TS, kVec>(p.source, p.source_stride_b, p.source_stride_n);
  const dim3 grid(static_cast<unsigned int>(tiles.row_tiles),
                  static_cast<unsigned int>(tiles.col_tiles));
  const dim3 block(tiles.block_threads);
  return vectorized
             ? launch_kernel(scaled_index_add_fwd_kernel<TX, TS, kVec>, grid, block, 0, stream, p)
             : launch_kernel(scaled_index_add_fwd_kernel<TX, TS, 1>, grid, block, 0, stream, p);
}

template <typename TG, typename TS>
cudaError_t launch_bwd(const BwdParams& p, const RowTiles& tiles, int64_t blocks,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / min_size<TG>(sizeof(TS));
  const bool vectorized =
      p.dim % kVec == 0 && vector_access_ok<TG, kVec>(p.grad, p.grad_stride_b, p.grad_stride_n) &&
      vector_access_ok<TS, kVec>(p.partial != nullptr ? p.source : nullptr, p.source_stride_b,
                                 p.source_stride_n) &&
      vector_access_ok<TS, kVec>(p.grad_source, p.grad_source_stride_b, p.grad_source_stride_n);
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(tiles.col_tiles));
  const dim3 block(tiles.block_threads);
  return vectorized
             ? launch_kernel(scaled_index_add_bwd_kernel<TG, TS, kVec>, grid, block, 0, stream, p)
             : launch_kernel(scaled_index_add_bwd_kernel<TG, TS, 1>, grid, block, 0, stream, p);
}

bool valid_scaling(const void* scaling, DType scaling_dtype) {
  return scaling == nullptr || is_valid_dtype_tag(static_cast<int64_t>(scaling_dtype));
}

}  // namespace

cudaError_t scaled_index_add_fwd(const void* x, void* out, const void* source,
                                 const void* scaling, const void* index, IndexType index_type,
                                 int64_t index_stride, int32_t* workspace, int64_t batch,
                                 int64_t k, int64_t tokens, int64_t dim, float alpha,
                                 int64_t x_stride_b, int64_t x_stride_n, int64_t out_stride_b,
                                 int64_t out_stride_n, int64_t source_stride_b,
                                 int64_t source_stride_n, bool inplace, DType x_dtype,
                                 DType source_dtype, DType scaling_dtype, cudaStream_t stream) {
  if (batch < 0 || k < 0 || k > batch || tokens < 0 || dim < 0) return cudaErrorInvalidValue;
  if (!valid_scaling(scaling, scaling_dtype)) return cudaErrorInvalidValue;
  FwdParams p{};
  p.x = x;
  p.out = out;
  p.source = source;
  p.scaling = scaling;
  p.scaling_dtype = scaling_dtype;
  p.index = IndexRef{index, index_stride, index_type == IndexType::kInt64};
  p.inverse = nullptr;
  p.inplace = inplace;
  p.k = k;
  p.rows = (inplace ? k : batch) * tokens;
  p.tokens = tokens;
  p.dim = dim;
  p.alpha = alpha;
  p.x_stride_b = x_stride_b;
  p.x_stride_n = x_stride_n;
  p.out_stride_b = out_stride_b;
  p.out_stride_n = out_stride_n;
  p.source_stride_b = source_stride_b;
  p.source_stride_n = source_stride_n;
  if (p.rows == 0 || dim == 0) return cudaSuccess;
  const RowTiles tiles = make_row_tiles(p.rows, dim);
  if (!row_tiles_fit_grid(tiles)) return cudaErrorInvalidValue;
  p.threads_per_row = tiles.threads_per_row;
  p.rows_per_iter = tiles.rows_per_iter;
  p.tile_cols = tiles.tile_cols;
  if (!inplace && inverse_index_workspace_size(k, batch) > 0) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    DINOV2_FAST_CHECK_CUDA(
        inverse_index(index, index_type, index_stride, k, batch, workspace, stream));
    p.inverse = workspace;
  }
  DINOV2_FAST_DTYPE_SWITCH(
      x_dtype, TX,
      DINOV2_FAST_DTYPE_SWITCH(source_dtype, TS, return launch_fwd<TX, TS>(p, tiles, stream)))
  return cudaErrorInvalidValue;
}

int64_t scaled_index_add_bwd_partial_rows(int64_t k, int64_t tokens, int64_t dim, int device) {
  if (k < 1 || tokens < 1 || dim < 1) return 1;
  const RowTiles tiles = make_row_tiles(k * tokens, dim);
  const int64_t blocks = ceil_div(static_cast<int64_t>(kBwdBlocksPerSm) *
                                      sm_count_or_default(device),
                                  tiles.col_tiles);
  return tiles.row_tiles < blocks ? tiles.row_tiles : blocks;
}

cudaError_t scaled_index_add_bwd(const void* grad, const void* source, const void* scaling,
                                 const void* index, IndexType index_type, int64_t index_stride,
                                 void* grad_source, void* grad_scaling, float* partial, int64_t k,
                                 int64_t tokens, int64_t dim, float alpha, int64_t grad_stride_b,
                                 int64_t grad_stride_n, int64_t source_stride_b,
                                 int64_t source_stride_n, int64_t grad_source_stride_b,
                                 int64_t grad_source_stride_n, DType grad_dtype,
                                 DType source_dtype, DType scaling_dtype, int device,
                                 cudaStream_t stream) {
  if (k < 0 || tokens < 0 || dim < 0) return cudaErrorInvalidValue;
  if (!valid_scaling(scaling, scaling_dtype)) return cudaErrorInvalidValue;
  const bool need_sums = grad_scaling != nullptr;
  if (need_sums && (scaling == nullptr || partial == nullptr)) return cudaErrorInvalidValue;
  const int64_t rows = k * tokens;
  if (rows == 0 || dim == 0) {
    // A sum over no rows is zero.
    return need_sums ? sum_partial_rows(partial, 0, dim, grad_scaling, scaling_dtype, stream)
                     : cudaSuccess;
  }
  if (grad_source == nullptr && !need_sums) return cudaSuccess;
  const RowTiles tiles = make_row_tiles(rows, dim);
  if (!row_tiles_fit_grid(tiles)) return cudaErrorInvalidValue;
  // Without grad_scaling there is nothing to reduce: one row tile per block.
  const int64_t blocks =
      need_sums ? scaled_index_add_bwd_partial_rows(k, tokens, dim, device) : tiles.row_tiles;
  BwdParams p{};
  p.grad = grad;
  p.source = source;
  p.scaling = scaling;
  p.scaling_dtype = scaling_dtype;
  p.index = IndexRef{index, index_stride, index_type == IndexType::kInt64};
  p.grad_source = grad_source;
  p.partial = need_sums ? partial : nullptr;
  p.rows = rows;
  p.row_tiles = tiles.row_tiles;
  p.tokens = tokens;
  p.dim = dim;
  p.alpha = alpha;
  p.grad_stride_b = grad_stride_b;
  p.grad_stride_n = grad_stride_n;
  p.source_stride_b = source_stride_b;
  p.source_stride_n = source_stride_n;
  p.grad_source_stride_b = grad_source_stride_b;
  p.grad_source_stride_n = grad_source_stride_n;
  p.threads_per_row = tiles.threads_per_row;
  p.rows_per_iter = tiles.rows_per_iter;
  p.tile_cols = tiles.tile_cols;
  cudaError_t status = cudaErrorInvalidValue;
  DINOV2_FAST_DTYPE_SWITCH(
      grad_dtype, TG,
      DINOV2_FAST_DTYPE_SWITCH(source_dtype, TS,
                               status = launch_bwd<TG, TS>(p, tiles, blocks, stream)))
  DINOV2_FAST_CHECK_CUDA(status);
  if (!need_sums) return cudaSuccess;
  return sum_partial_rows(partial, blocks, dim, grad_scaling, scaling_dtype, stream);
}

}  // namespace dinov2_fast
