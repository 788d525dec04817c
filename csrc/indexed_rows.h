// Shared by the kernels that gather or scatter whole samples of [B, N, D] tensors
// (index_select_cat.cu, scaled_index_add.cu): the tile layout, index reads, the inverse index and
// the fixed-order sum of partial rows. The CUDA counterpart of kernels/_indexing.py.
//
// A sample tensor is [B, N, D] with unit stride along D and element strides stride_b, stride_n
// (any, 0 included). Kernels view it as flat rows r = sample * N + n and cut the rows into tiles
// of kRowIters * rows_per_iter rows and tile_cols columns (grid: x = row tiles, y = column tiles).
// A block holds rows_per_iter row groups of threads_per_row threads; thread `lane` of a group
// owns the columns col0 + (c * threads_per_row + lane) * kVec + [0, kVec) for c < kColsPerThread
// / kVec, so each access is a kVec-wide vector, a group's accesses are coalesced, and the columns
// a thread owns do not depend on the row (the backward keeps per-column sums in registers).
// Each row finds its partner sample through the index (index[j] = b) or through the inverse
// index (j with index[j] = b, or -1).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace dinov2_fast {

// The tag Python passes for an index tensor's dtype. The integers are part of the Python interface.
enum class IndexType : int {
  kInt32 = 0,
  kInt64 = 1,
};

inline bool is_valid_index_type_tag(int64_t tag) { return tag == 0 || tag == 1; }

// Columns per thread and row: one 16-byte vector of a 16-bit type, two of fp32, or eight scalars.
constexpr int kColsPerThread = 8;
// Threads of a block; several row groups share a block when rows are narrow.
constexpr int kTileThreads = 256;
// Widest tile; wider rows take several column tiles of equal width.
constexpr int kMaxTileCols = kColsPerThread * 128;
// Rows a thread handles per tile, all loads issued before any store: with 16-byte vectors that
// is 4 to 8 loads in flight per thread and tensor.
constexpr int kRowIters = 4;
constexpr int kMaxTileRows = kRowIters * kTileThreads;
// Up to this many indices each block finds the partners of its own rows by scanning the index
// (no extra launch); beyond it, a one-block kernel first writes the inverse index to a workspace.
constexpr int64_t kLocalInverseMaxIndices = 512;
// Used when the SM count cannot be queried (an H100 SXM has 132).
constexpr int kDefaultSmCount = 132;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct RowTiles {
  int threads_per_row;
  int rows_per_iter;
  int block_threads;
  int tile_cols;
  int col_tiles;
  int64_t row_tiles;
};

// The tiles of `rows` flat rows of width dim >= 1. Column tiles have equal width (a multiple of
// kColsPerThread), so that 384 or 1536 wide rows leave no idle thread column.
inline RowTiles make_row_tiles(int64_t rows, int64_t dim) {
  const int64_t col_tiles = ceil_div(dim, kMaxTileCols);
  const int64_t tile_cols = ceil_div(ceil_div(dim, col_tiles), kColsPerThread) * kColsPerThread;
  const int threads_per_row = static_cast<int>(tile_cols / kColsPerThread);
  const int rows_per_iter = kTileThreads / threads_per_row;
  return {threads_per_row,
          rows_per_iter,
          rows_per_iter * threads_per_row,
          static_cast<int>(tile_cols),
          static_cast<int>(col_tiles),
          ceil_div(rows, static_cast<int64_t>(kRowIters) * rows_per_iter)};
}

// Whether the tiles of make_row_tiles(rows, dim) fit in a grid (x < 2^31, y < 2^16).
inline bool row_tiles_fit_grid(const RowTiles& tiles) {
  return tiles.row_tiles <= INT32_MAX && tiles.col_tiles <= 65535;
}

// Int32 elements of the inverse-index workspace that k indices into `size` samples need: 0 when
// every block scans the index itself.
inline int64_t inverse_index_workspace_size(int64_t k, int64_t size) {
  return k > kLocalInverseMaxIndices ? size : 0;
}

// The device's SM count, or kDefaultSmCount when it cannot be queried (the error is cleared).
int sm_count_or_default(int device);

// inv[s] = j where index[j * index_stride] == s, else -1, for s < size: one block, so it is one
// launch whatever k and size are (they are batch-sized). Indices must be unique and in range.
cudaError_t inverse_index(const void* index, IndexType index_type, int64_t index_stride,
                          int64_t k, int64_t size, int32_t* inv, cudaStream_t stream);

// out[col] = sum over p < num_rows of partial[p * dim + col], in a fixed order, rounded once to
// out_dtype; num_rows == 0 writes zeros.
cudaError_t sum_partial_rows(const float* partial, int64_t num_rows, int64_t dim, void* out,
                             DType out_dtype, cudaStream_t stream);

}  // namespace dinov2_fast

#if defined(__CUDACC__) || defined(DINOV2_FAST_EMULATE)

namespace dinov2_fast {

// A 1-D int32 or int64 index with an element stride.
struct IndexRef {
  const void* ptr;
  int64_t stride;
  bool is_int64;

  __device__ __forceinline__ int64_t operator[](int64_t j) const {
    return is_int64 ? static_cast<const int64_t*>(ptr)[j * stride]
                    : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[j * stride]);
  }
};

// One float from element i of a float32/float16/bfloat16 array chosen at run time (parameters
// such as LayerScale's gamma: a few L1-resident values per thread, not worth an instantiation).
__device__ __forceinline__ float load_float(const void* ptr, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const __half*>(ptr)[i]);
    case DType::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(ptr)[i]);
    default:
      return static_cast<const float*>(ptr)[i];
  }
}

// The tile's view of the inverse index: the partner of samples [first, first + count) (the
// samples a tile's rows touch, count <= kMaxTileRows). Every thread of the block must call it.
// With a global inverse (the workspace) it only remembers the pointer; otherwise the block scans
// the index once and keeps the partners in `slots`.
struct TileInverse {
  const int32_t* global;
  const int32_t* slots;
  int64_t first;

  __device__ __forceinline__ int64_t operator[](int64_t sample) const {
    return global != nullptr ? global[sample] : slots[sample - first];
  }
};

__device__ __forceinline__ TileInverse tile_inverse(IndexRef index, int64_t k,
                                                    const int32_t* global, int64_t first,
                                                    int64_t count, int32_t* slots) {
  if (global != nullptr) return {global, slots, first};
  for (int64_t s = threadIdx.x; s < count; s += blockDim.x) slots[s] = -1;
  __syncthreads();
  // Indices are unique, so no two threads write one slot.
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const int64_t s = index[j] - first;
    if (s >= 0 && s < count) slots[s] = static_cast<int32_t>(j);
  }
  __syncthreads();
  return {nullptr, slots, first};
}

// The samples [first, first + count) that the rows of row tile `tile` touch.
__device__ __forceinline__ void tile_samples(int64_t tile, int rows_per_iter, int64_t rows,
                                             int64_t tokens, int64_t* first, int64_t* count) {
  const int64_t row0 = tile * kRowIters * rows_per_iter;
  int64_t end = row0 + static_cast<int64_t>(kRowIters) * rows_per_iter;
  if (end > rows) end = rows;
  *first = row0 / tokens;
  *count = end > row0 ? (end - 1) / tokens - *first + 1 : 0;
}

// A vector of kVec elements set to zero bits (+0.0 in every float format).
template <typename T, int kVec>
__device__ __forceinline__ void zero_vec(AlignedVec<T, kVec>* v) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) v->data[e] = T(0);
}

}  // namespace dinov2_fast

#endif  // defined(__CUDACC__) || defined(DINOV2_FAST_EMULATE)
