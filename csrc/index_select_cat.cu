// index_select_cat's gather and scatter kernels (see index_select_cat.h for the contract).
//
// Byte model: the gather reads and writes k * N * D elements; the scatter reads k * N * D and
// writes size * N * D (zeros included). Nothing else touches DRAM: the index (batch-sized) stays
// in L1/L2. So the floor is the copy time of those bytes, and the target (>= 80% of the copy
// bandwidth, 2.4 TB/s on an H100) needs full 16-byte accesses, no idle lanes and enough bytes in
// flight.
//
// Launch shape (indexed_rows.h): 256-thread blocks over tiles of 4 row iterations; a thread issues
// all its loads of a tile before its first store, 4 (16-bit types) or 8 (fp32) 16-byte vectors.
// At 6 or more resident blocks per SM that is >= 96 KiB in flight per SM, four times what Little's
// law asks at 3 TB/s and ~1 us of latency over 132 SMs (~23 KiB). Tiles move 16 to 32 KiB for
// ViT widths, so a ViT-L group ([38, 257, 1024] bf16) is ~1200 short blocks: several per SM, which
// keeps the tail small. Column tiles have equal width (384 = one tile of 48 threads per row), so
// lanes are idle only in a partial last warp. The scalar path (misaligned pointers, strides or D)
// keeps the layout with one-element accesses, still coalesced across a row group.
#include "index_select_cat.h"

namespace dinov2_fast {
namespace {

struct CopyParams {
  const void* src;
  void* dst;
  IndexRef index;
  // Scatter: the inverse index (global workspace, or null to scan the index per tile).
  const int32_t* inverse;
  bool scatter;
  int64_t k;
  int64_t rows;  // destination samples * N
  int64_t tokens;
  int64_t dim;
  int64_t src_stride_b;
  int64_t src_stride_n;
  int64_t dst_stride_b;
  int64_t dst_stride_n;
  int threads_per_row;
  int rows_per_iter;
  int tile_cols;
};

// Destination rows walk the tile; each copies its partner row of src (the index for the gather,
// the inverse index for the scatter) or writes zeros when it has none. W is the element's bits.
template <typename W, int kVec>
__global__ void __launch_bounds__(kTileThreads) index_copy_rows_kernel(CopyParams p) {
  constexpr int kChunks = kColsPerThread / kVec;
  __shared__ int32_t slots[kMaxTileRows];
  const int64_t tile = blockIdx.x;
  TileInverse inverse{p.inverse, slots, 0};
  if (p.scatter) {
    int64_t first, count;
    tile_samples(tile, p.rows_per_iter, p.rows, p.tokens, &first, &count);
    inverse = tile_inverse(p.index, p.k, p.inverse, first, count, slots);
  }
  const int group = threadIdx.x / p.threads_per_row;
  const int lane = threadIdx.x % p.threads_per_row;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * p.tile_cols;
  const W* src = static_cast<const W*>(p.src);
  W* dst = static_cast<W*>(p.dst);

  AlignedVec<W, kVec> values[kRowIters][kChunks];
  int64_t dst_offset[kRowIters];
#pragma unroll
  for (int i = 0; i < kRowIters; ++i) {
    const int64_t row = (tile * kRowIters + i) * p.rows_per_iter + group;
    dst_offset[i] = -1;
    if (row >= p.rows) continue;
    const int64_t sample = row / p.tokens;
    const int64_t n = row - sample * p.tokens;
    const int64_t partner = p.scatter ? inverse[sample] : p.index[sample];
    dst_offset[i] = sample * p.dst_stride_b + n * p.dst_stride_n;
    const W* src_row = src + (partner >= 0 ? partner * p.src_stride_b + n * p.src_stride_n : 0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
      if (col >= p.dim) continue;
      if (partner >= 0) {
        copy_vec(&values[i][c], reinterpret_cast<const AlignedVec<W, kVec>*>(src_row + col));
      } else {
        zero_vec(&values[i][c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowIters; ++i) {
    if (dst_offset[i] < 0) continue;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = col0 + (c * p.threads_per_row + lane) * kVec;
      if (col >= p.dim) continue;
      copy_vec(reinterpret_cast<AlignedVec<W, kVec>*>(dst + dst_offset[i] + col), &values[i][c]);
    }
  }
}

template <typename W>
cudaError_t launch_copy(const CopyParams& p, const RowTiles& tiles, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(W);
  const bool vectorized = p.dim % kVec == 0 &&
                          vector_access_ok<W, kVec>(p.src, p.src_stride_b, p.src_stride_n) &&
                          vector_access_ok<W, kVec>(p.dst, p.dst_stride_b, p.dst_stride_n);
  const dim3 grid(static_cast<unsigned int>(tiles.row_tiles),
                  static_cast<unsigned int>(tiles.col_tiles));
  const dim3 block(tiles.block_threads);
  return vectorized ? launch_kernel(index_copy_rows_kernel<W, kVec>, grid, block, 0, stream, p)
                    : launch_kernel(index_copy_rows_kernel<W, 1>, grid, block, 0, stream, p);
}

cudaError_t copy_rows(CopyParams p, int64_t samples, DType dtype, cudaStream_t stream) {
  if (samples < 0 || p.k < 0 || p.tokens < 0 || p.dim < 0) return cudaErrorInvalidValue;
  if (!is_valid_dtype_tag(static_cast<int64_t>(dtype))) return cudaErrorInvalidValue;
  p.rows = samples * p.tokens;
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  const RowTiles tiles = make_row_tiles(p.rows, p.dim);
  if (!row_tiles_fit_grid(tiles)) return cudaErrorInvalidValue;
  p.threads_per_row = tiles.threads_per_row;
  p.rows_per_iter = tiles.rows_per_iter;
  p.tile_cols = tiles.tile_cols;
  // A copy moves bits: the element size picks the kernel.
  return dtype == DType::kFloat32 ? launch_copy<uint32_t>(p, tiles, stream)
                                  : launch_copy<uint16_t>(p, tiles, stream);
}

}  // namespace

cudaError_t index_select_rows(const void* src, void* dst, const void* index, IndexType index_type,
                              int64_t index_stride, int64_t k, int64_t tokens, int64_t dim,
                              int64_t src_stride_b, int64_t src_stride_n, int64_t dst_stride_b,
                              int64_t dst_stride_n, DType dtype, cudaStream_t stream) {
  CopyParams p{};
  p.src = src;
  p.dst = dst;
  p.index = IndexRef{index, index_stride, index_type == IndexType::kInt64};
  p.inverse = nullptr;
  p.scatter = false;
  p.k = k;
  p.tokens = tokens;
  p.dim = dim;
  p.src_stride_b = src_stride_b;
  p.src_stride_n = src_stride_n;
  p.dst_stride_b = dst_stride_b;
  p.dst_stride_n = dst_stride_n;
  return copy_rows(p, k, dtype, stream);
}

cudaError_t index_scatter_rows(const void* grad, void* dst, const void* index,
                               IndexType index_type, int64_t index_stride, int64_t k, int64_t size,
                               int64_t tokens, int64_t dim, int64_t grad_stride_b,
                               int64_t grad_stride_n, int64_t dst_stride_b, int64_t dst_stride_n,
                               int32_t* workspace, DType dtype, cudaStream_t stream) {
  if (k < 0 || size < 0 || k > size) return cudaErrorInvalidValue;
  CopyParams p{};
  p.src = grad;
  p.dst = dst;
  p.index = IndexRef{index, index_stride, index_type == IndexType::kInt64};
  p.inverse = nullptr;
  p.scatter = true;
  p.k = k;
  p.tokens = tokens;
  p.dim = dim;
  p.src_stride_b = grad_stride_b;
  p.src_stride_n = grad_stride_n;
  p.dst_stride_b = dst_stride_b;
  p.dst_stride_n = dst_stride_n;
  if (size > 0 && tokens > 0 && dim > 0 && inverse_index_workspace_size(k, size) > 0) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    DINOV2_FAST_CHECK_CUDA(
        inverse_index(index, index_type, index_stride, k, size, workspace, stream));
    p.inverse = workspace;
  }
  return copy_rows(p, size, dtype, stream);
}

}  // namespace dinov2_fast
