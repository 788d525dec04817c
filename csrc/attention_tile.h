// Tile building blocks shared by the attention kernels (attention_fwd.cu, attention_bwd.cu).
//
// Tiles of 16-bit elements live in shared memory row-major with a pitch of D + 8 elements: the
// 16-byte pad shifts consecutive rows by four banks, so the eight 16-byte rows an ldmatrix
// phase reads hit eight different bank groups (no conflicts) without an XOR swizzle.
//
// A warp owns 16 rows of every product it computes (one m16 tile); accumulators are arrays of
// mma C fragments, acc[j] covering columns 8j .. 8j+7 (layout in mma.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "common.h"
#include "mma.h"

namespace dinov2_fast {
namespace attention_tile {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim>
struct TileGeometry {
  static_assert(kHeadDim % 16 == 0, "head dims are multiples of the mma k step (16)");
  static constexpr int kPitch = kHeadDim + 8;     // elements per shared-memory row
  static constexpr int kChunks = kHeadDim / 8;    // 16-byte chunks per row
};

// Starts cp.async copies of a [kRows, kHeadDim] tile whose row r is at src + r * row_stride into
// shared memory (pitch kPitch). Rows >= valid_rows are zero-filled: a ragged tail reads nothing
// past the sequence and contributes exact zeros. All threads of the block take part.
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* src, int64_t row_stride,
                                                int valid_rows) {
  using G = TileGeometry<kHeadDim>;
  for (int chunk = threadIdx.x; chunk < kRows * G::kChunks; chunk += kThreads) {
    const int row = chunk / G::kChunks;
    const int col = (chunk % G::kChunks) * 8;
    const bool valid = row < valid_rows;
    // A zero-byte copy still needs a mapped address: row 0 always is.
    const T* from = valid ? src + row * row_stride + col : src;
    cp_async_16(smem + row * G::kPitch + col, from, valid ? 16 : 0);
  }
}

// Starts the copies of key/value tile `tile` (kBlockN rows from k and v; the sequence's `length`
// bounds the valid ones) into stage `stage` of `stages`: k at 2 * stage, v at 2 * stage + 1.
template <typename T, int kBlockN, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_key_value_tiles(T* stages, int stage, int tile, int length,
                                                     const T* k, int64_t k_stride, const T* v,
                                                     int64_t v_stride) {
  constexpr int kTileElems = kBlockN * TileGeometry<kHeadDim>::kPitch;
  const int valid = length - tile * kBlockN;
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(stages + 2 * stage * kTileElems,
                                                  k + tile * kBlockN * k_stride, k_stride, valid);
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(stages + (2 * stage + 1) * kTileElems,
                                                  v + tile * kBlockN * v_stride, v_stride, valid);
}

// One step of the two-stage pipeline: start the copies of the next tile (when there is one) so
// they overlap this tile's math, then wait until this tile's copies have landed for all threads.
template <typename StartNext>
__device__ __forceinline__ void advance_pipeline(bool has_next, StartNext&& start_next) {
  if (has_next) {
    start_next();
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// acc[16 x kN] += A[16 x kK] * B^T, where A's 16 rows start at a (shared, pitch kPitch) and B is
// stored n-major: its kN rows of kK elements start at b (shared, pitch kPitch). This is q k^T
// with both operands as loaded (both need the non-transposing ldmatrix). Only the first n_valid
// rows of B hold data (a ragged last tile): the 16-row steps past them are skipped, their
// accumulators left as they were.
template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void mma_rows_by_rows_upto(float (&acc)[kN / 8][4], const T* a,
                                                      const T* b, int n_valid) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles are multiples of 16");
  const int lane = threadIdx.x % kWarpSize;
  const int matrix = lane / 8;  // which of the four 8x8 matrices this lane addresses
  const int row = lane % 8;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a_frag[4];
    // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
    ldmatrix_x4(a_frag, a + ((matrix % 2) * 8 + row) * kPitch + kk * 16 + (matrix / 2) * 8);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      if (nn * 16 >= n_valid) break;
      uint32_t b_frag[4];
      // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
      ldmatrix_x4(b_frag, b + (nn * 16 + (matrix / 2) * 8 + row) * kPitch + kk * 16 +
                              (matrix % 2) * 8);
      const uint32_t b_lo[2] = {b_frag[0], b_frag[1]};
      const uint32_t b_hi[2] = {b_frag[2], b_frag[3]};
      mma_m16n8k16<T>(acc[2 * nn], a_frag, b_lo, acc[2 * nn]);
      mma_m16n8k16<T>(acc[2 * nn + 1], a_frag, b_hi, acc[2 * nn + 1]);
    }
  }
}

// acc[16 x kN] += A[16 x kK] * B, with A in registers (a[kK / 16], mma A fragments) and B stored
// k-major: its kK rows of kN elements start at b (shared, pitch kPitch). This is p v: the
// transposing ldmatrix turns rows of v into B fragments. Only the first k_valid rows of B hold
// data, and A is zero past them: the 16-row k steps past them are skipped (as n_valid above).
template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void mma_regs_by_rows_upto(float (&acc)[kN / 8][4],
                                                      const uint32_t (&a)[kK / 16][4], const T* b,
                                                      int k_valid) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles are multiples of 16");
  const int lane = threadIdx.x % kWarpSize;
  const int matrix = lane / 8;
  const int row = lane % 8;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    if (kk * 16 >= k_valid) break;
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t b_frag[4];
      // matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
      ldmatrix_x4_trans(b_frag, b + (kk * 16 + (matrix % 2) * 8 + row) * kPitch + nn * 16 +
                                    (matrix / 2) * 8);
      const uint32_t b_lo[2] = {b_frag[0], b_frag[1]};
      const uint32_t b_hi[2] = {b_frag[2], b_frag[3]};
      mma_m16n8k16<T>(acc[2 * nn], a[kk], b_lo, acc[2 * nn]);
      mma_m16n8k16<T>(acc[2 * nn + 1], a[kk], b_hi, acc[2 * nn + 1]);
    }
  }
}

// The two products for a tile of which `valid` rows hold data (more than the tile: all): full
// tiles, all but the last, get their own copy of the loops, without the tests.
template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[kN / 8][4], const T* a, const T* b,
                                                 int valid = kN) {
  if (valid >= kN) {
    mma_rows_by_rows_upto<T, kN, kK, kPitch>(acc, a, b, kN);
  } else {
    mma_rows_by_rows_upto<T, kN, kK, kPitch>(acc, a, b, valid);
  }
}

template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void mma_regs_by_rows(float (&acc)[kN / 8][4],
                                                 const uint32_t (&a)[kK / 16][4], const T* b,
                                                 int valid = kK) {
  if (valid >= kK) {
    mma_regs_by_rows_upto<T, kN, kK, kPitch>(acc, a, b, kK);
  } else {
    mma_regs_by_rows_upto<T, kN, kK, kPitch>(acc, a, b, valid);
  }
}

// The C fragments of a [16 x kN] fp32 product as A fragments of a [16 x kN] 16-bit operand: the
// C layout of columns 16c .. 16c+15 is the A layout of k step c (no shuffles, as in FA2).
template <typename T, int kN>
__device__ __forceinline__ void accumulators_to_operand(const float (&acc)[kN / 8][4],
                                                        uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int c = 0; c < kN / 16; ++c) {
    a[c][0] = pack_float2<T>(acc[2 * c][0], acc[2 * c][1]);
    a[c][1] = pack_float2<T>(acc[2 * c][2], acc[2 * c][3]);
    a[c][2] = pack_float2<T>(acc[2 * c + 1][0], acc[2 * c + 1][1]);
    a[c][3] = pack_float2<T>(acc[2 * c + 1][2], acc[2 * c + 1][3]);
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  }
}

// Reduces over the four lanes of a quad (lane / 4 equal): the lanes that hold one row of a C
// fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Stores the warp's [16 x kN] accumulators times `factor[row half]` as T to dst (row r at
// dst + r * row_stride), rows >= valid_rows skipped. Each thread writes 2 elements (4 bytes).
template <typename T, int kN>
__device__ __forceinline__ void store_rows(const float (&acc)[kN / 8][4], const float (&factor)[2],
                                           T* dst, int64_t row_stride, int valid_rows) {
  const int lane = threadIdx.x % kWarpSize;
  const int group = lane / 4;
  const int pair = (lane % 4) * 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = group + half * 8;
    if (row >= valid_rows) continue;
    T* out = dst + row * row_stride + pair;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      *reinterpret_cast<uint32_t*>(out + j * 8) =
          pack_float2<T>(acc[j][2 * half] * factor[half], acc[j][2 * half + 1] * factor[half]);
    }
  }
}

// Calls launch(T()) with T the 16-bit element type of `dtype` (float16 or bfloat16).
template <typename Launch>
cudaError_t with_element_type(DType dtype, Launch&& launch) {
  if (dtype == DType::kFloat16) return launch(__half());
  return launch(__nv_bfloat16());
}

// Calls launch(std::integral_constant<int, D>()) for the compiled head dim D == head_dim.
template <typename Launch>
cudaError_t with_head_dim(int64_t head_dim, Launch&& launch) {
  switch (head_dim) {
    case 32:
      return launch(std::integral_constant<int, 32>());
    case 64:
      return launch(std::integral_constant<int, 64>());
    case 80:
      return launch(std::integral_constant<int, 80>());
    case 96:
      return launch(std::integral_constant<int, 96>());
    case 128:
      return launch(std::integral_constant<int, 128>());
  }
  return cudaErrorInvalidValue;
}

// Host-side checks of the launchers' requirements (attention.h).
inline bool attention_arguments_ok(const AttentionShape& s) {
  constexpr int64_t kMaxGridAxis = 65535;
  return is_attention_head_dim(s.head_dim) &&
         (s.dtype == DType::kFloat16 || s.dtype == DType::kBFloat16) && s.batch >= 0 &&
         s.batch <= kMaxGridAxis && s.heads >= 0 && s.heads <= kMaxGridAxis && s.seqlen >= 0 &&
         s.seqlen <= INT32_MAX / 2 && s.scale > 0.0f;
}

// A source of 16-byte cp.async copies: the pointer and every row start 16-byte aligned.
inline bool copy_source_ok(const void* ptr, TokenStrides s) {
  return is_aligned(ptr, 16) && s.b % 8 == 0 && s.n % 8 == 0 && s.h % 8 == 0;
}

// A destination of 2-element (4-byte) stores.
inline bool pair_store_ok(const void* ptr, TokenStrides s) {
  return is_aligned(ptr, 4) && s.b % 2 == 0 && s.n % 2 == 0 && s.h % 2 == 0;
}

// Where a (sequence, head) lives: the token offset of its first row in q-like tensors, its
// length, and the offset of its first row in lse-like tensors.
struct Sequence {
  int64_t first_token;  // varlen: cu_seqlens[seq]; dense: 0 (the batch stride moves instead)
  int length;
};

__device__ __forceinline__ Sequence sequence_of(const AttentionShape& shape, int64_t seq) {
  if (shape.cu_seqlens == nullptr) return {0, static_cast<int>(shape.seqlen)};
  const int32_t start = shape.cu_seqlens[seq];
  return {start, shape.cu_seqlens[seq + 1] - start};
}

// Element offset of token `row` of the sequence, head `head`, in a tensor with strides s.
__device__ __forceinline__ int64_t token_offset(TokenStrides s, int64_t seq, Sequence sequence,
                                                int64_t row, int64_t head) {
  return seq * s.b + (sequence.first_token + row) * s.n + head * s.h;
}

__device__ __forceinline__ int64_t lse_offset(const AttentionShape& shape, int64_t seq,
                                              Sequence sequence, int64_t row, int64_t head) {
  return seq * shape.lse_stride_b + head * shape.lse_stride_h + sequence.first_token + row;
}

}  // namespace attention_tile
}  // namespace dinov2_fast
