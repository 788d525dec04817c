// Attention forward (see attention.h for the contract), FlashAttention-2's schedule:
//
// A block owns kBlockM query rows of one (sequence, head); each of its kWarps warps owns 16 of
// them. It streams the sequence's keys and values in tiles of kBlockN rows through two
// shared-memory stages (cp.async: the copy of tile j + 1 overlaps the math of tile j), and per
// tile computes S = q k^T on the tensor cores, the online softmax in fp32 (row max and sum kept per
// thread, the max reduced over the quad that shares a row), rescales its O accumulators and adds
// P v with P rounded to the input dtype in registers (the C fragments of S are already the A
// fragments of P). The last tile of a ragged sequence has its missing keys zero-filled and their
// scores set to -inf, and skips its 16-key steps that hold no key; in the last block of queries,
// warps with no row skip the math. O is divided by the row sum at the end; lse = m * scale +
// log(sum).
//
// FLOPs: 4 * N^2 * D per (sequence, head); bytes: q, k, v read once per query block, o written.
#include <algorithm>

#include "attention.h"
#include "attention_tile.h"

namespace dinov2_fast {
namespace {

using namespace attention_tile;

struct FwdParams {
  AttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  TokenStrides q_strides, k_strides, v_strides, o_strides;
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN>
struct FwdConfig {
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = TileGeometry<kHeadDim>::kPitch;
  // q tile, then two stages of (k tile, v tile).
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(kBlockM + 4 * kBlockN) * kPitch * sizeof(T);
};

// One key tile for the warp's 16 query rows: S = q k^T, the online softmax update of row_max,
// row_sum and o_acc, then O += P v with P rounded to T in registers (the C fragments of S are
// already the A fragments of P). valid_keys < kBlockN marks the ragged last tile: its missing keys
// score -inf, and the 16-key steps that hold none of its keys are skipped.
template <typename T, int kHeadDim, int kBlockN, int kPitch>
__device__ __forceinline__ void online_softmax_step(const T* q_rows, const T* k_tile,
                                                    const T* v_tile, int valid_keys,
                                                    float scale_log2, float (&row_max)[2],
                                                    float (&row_sum)[2],
                                                    float (&o_acc)[kHeadDim / 8][4]) {
  const int lane = threadIdx.x % kWarpSize;
  float s[kBlockN / 8][4];
  zero(s);
  mma_rows_by_rows<T, kBlockN, kHeadDim, kPitch>(s, q_rows, k_tile, valid_keys);
  if (valid_keys < kBlockN) {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (j * 8 + (lane % 4) * 2 + (e % 2) >= valid_keys) s[j][e] = -INFINITY;
      }
    }
  }

  // Online softmax: new maxima, rescale what was summed so far, exponentiate this tile.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      tile_max = fmaxf(tile_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
    }
    const float new_max = fmaxf(row_max[half], quad_max(tile_max));
    // Every tile holds at least one real key, so new_max is finite; exp2(-inf) = 0 on tile 0.
    const float rescale = exp2f((row_max[half] - new_max) * scale_log2);
    row_max[half] = new_max;
    const float shift = new_max * scale_log2;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      s[j][2 * half] = exp2f(s[j][2 * half] * scale_log2 - shift);
      s[j][2 * half + 1] = exp2f(s[j][2 * half + 1] * scale_log2 - shift);
      sum += s[j][2 * half] + s[j][2 * half + 1];
    }
    row_sum[half] = row_sum[half] * rescale + sum;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      o_acc[j][2 * half] *= rescale;
      o_acc[j][2 * half + 1] *= rescale;
    }
  }

  uint32_t p_frag[kBlockN / 16][4];
  accumulators_to_operand<T, kBlockN>(s, p_frag);
  mma_regs_by_rows<T, kHeadDim, kBlockN, kPitch>(o_acc, p_frag, v_tile, valid_keys);
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(FwdConfig<T, kHeadDim, kBlockM, kBlockN>::kThreads)
    attention_fwd_kernel(FwdParams p) {
  using Config = FwdConfig<T, kHeadDim, kBlockM, kBlockN>;
  constexpr int kPitch = Config::kPitch;
  const int64_t seq = blockIdx.z;
  const int64_t head = blockIdx.y;
  const Sequence sequence = sequence_of(p.shape, seq);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= sequence.length) return;  // grids cover max_seqlen; shorter sequences end early

  DINOV2_FAST_DYNAMIC_SHARED(smem_bytes);
  T* q_tile = reinterpret_cast<T*>(smem_bytes);
  T* kv_stages = q_tile + kBlockM * kPitch;  // stage s: k at 2s, v at 2s + 1 (kBlockN rows each)

  const T* q = static_cast<const T*>(p.q) + token_offset(p.q_strides, seq, sequence, m0, head);
  const T* k = static_cast<const T*>(p.k) + token_offset(p.k_strides, seq, sequence, 0, head);
  const T* v = static_cast<const T*>(p.v) + token_offset(p.v_strides, seq, sequence, 0, head);
  const int key_tiles = (sequence.length + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int tile, int stage) {
    load_key_value_tiles<T, kBlockN, kHeadDim, Config::kThreads>(
        kv_stages, stage, tile, sequence.length, k, p.k_strides.n, v, p.v_strides.n);
  };

  load_tile_async<T, kBlockM, kHeadDim, Config::kThreads>(q_tile, q, p.q_strides.n,
                                                          sequence.length - m0);
  load_kv(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const T* q_rows = q_tile + warp * 16 * kPitch;
  const float scale_log2 = p.shape.scale * kLog2e;

  float o_acc[kHeadDim / 8][4];
  zero(o_acc);
  // Per thread: rows lane / 4 and lane / 4 + 8 of the warp's 16 (C fragment layout).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  // Idle warps of a ragged last block still copy and meet the barriers.
  const bool warp_has_rows = m0 + warp * 16 < sequence.length;

  for (int tile = 0; tile < key_tiles; ++tile) {
    const int stage = tile % 2;
    advance_pipeline(tile + 1 < key_tiles, [&] { load_kv(tile + 1, 1 - stage); });
    const T* k_tile = kv_stages + (2 * stage) * kBlockN * kPitch;
    const T* v_tile = kv_stages + (2 * stage + 1) * kBlockN * kPitch;
    const int valid_keys = sequence.length - tile * kBlockN;
    if (warp_has_rows) {
      online_softmax_step<T, kHeadDim, kBlockN, kPitch>(q_rows, k_tile, v_tile, valid_keys,
                                                         scale_log2, row_max, row_sum, o_acc);
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
  }

  float inverse_sum[2];
  float* lse = p.lse + lse_offset(p.shape, seq, sequence, m0 + warp * 16, head);
  const int valid_rows = sequence.length - m0 - warp * 16;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = quad_sum(row_sum[half]);
    inverse_sum[half] = 1.0f / total;
    const int row = lane / 4 + half * 8;
    if (lane % 4 == 0 && row < valid_rows) {
      lse[row] = row_max[half] * p.shape.scale + logf(total);
    }
  }
  T* o = static_cast<T*>(p.o) +
         token_offset(p.o_strides, seq, sequence, m0 + warp * 16, head);
  store_rows<T, kHeadDim>(o_acc, inverse_sum, o, p.o_strides.n, valid_rows);
}

template <typename T, int kHeadDim>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  // 64 x 64 tiles, 4 warps: O (kHeadDim / 2 floats a thread) and S (32) fit in registers up to
  // D = 128, and 64-row blocks keep 5 blocks per (sequence, head) busy at DINOv2's 257 tokens.
  constexpr int kBlockM = 64;
  constexpr int kBlockN = 64;
  using Config = FwdConfig<T, kHeadDim, kBlockM, kBlockN>;
  auto kernel = attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN>;
  DINOV2_FAST_CHECK_CUDA(set_max_dynamic_shared_memory(kernel, Config::kSmemBytes));
  const dim3 grid(static_cast<unsigned>((p.shape.seqlen + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.shape.heads), static_cast<unsigned>(p.shape.batch));
  return launch_kernel(kernel, grid, dim3(Config::kThreads), Config::kSmemBytes, stream, p);
}

}  // namespace

cudaError_t attention_fwd(const AttentionShape& shape, const void* q, TokenStrides q_strides,
                          const void* k, TokenStrides k_strides, const void* v,
                          TokenStrides v_strides, void* o, TokenStrides o_strides, float* lse,
                          cudaStream_t stream) {
  if (!attention_arguments_ok(shape) || !copy_source_ok(q, q_strides) ||
      !copy_source_ok(k, k_strides) || !copy_source_ok(v, v_strides) ||
      !pair_store_ok(o, o_strides)) {
    return cudaErrorInvalidValue;
  }
  if (shape.batch == 0 || shape.seqlen == 0 || shape.heads == 0) return cudaSuccess;
  const FwdParams params{shape, q, k, v, o, lse, q_strides, k_strides, v_strides, o_strides};
  return with_element_type(shape.dtype, [&](auto element) {
    return with_head_dim(shape.head_dim, [&](auto head_dim) {
      return launch_fwd<decltype(element), decltype(head_dim)::value>(params, stream);
    });
  });
}

}  // namespace dinov2_fast
