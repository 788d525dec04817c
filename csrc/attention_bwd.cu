// Attention backward (see attention.h for the contract), FlashAttention-2's three launches:
//
// 1. delta = rowsum(dO * O), fp32, laid out as lse (= rowsum(P * dP), which dS needs).
// 2. dK, dV: a block owns kBlockN keys (16 per warp) of one (sequence, head) and streams the
//    query tiles (q, dO, lse, delta) through two shared-memory stages. Per tile, for its keys:
//    P^T = exp(scale k q^T - lse) recomputed from the saved lse, dV += P^T dO,
//    dP^T = v dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T q (times scale at the end).
// 3. dQ: a block owns kBlockM queries (16 per warp) and streams the key tiles (k, v):
//    P = exp(scale q k^T - lse), dP = dO v^T, dS = P * (dP - delta), dQ += dS k.
// Splitting dK/dV from dQ costs one more q k^T but needs no atomics: every gradient element is
// summed by one thread in a fixed order, so the result is the same on every run. P and dS are
// rounded to the input dtype as tensor-core operands (as in FlashAttention); everything else is
// fp32. Padded rows: queries past the end read lse = +inf (P = 0) and delta = 0; keys past the
// end have P set to 0. A ragged last tile skips its 16-row steps that hold no row, and warps
// whose 16 rows (dQ) or keys (dK/dV) all lie past the end skip the math.
#include "attention.h"
#include "attention_tile.h"

namespace dinov2_fast {
namespace {

using namespace attention_tile;

struct BwdParams {
  AttentionShape shape;
  const void* d_out;
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const float* lse;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  TokenStrides do_strides, q_strides, k_strides, v_strides, o_strides;
  TokenStrides dq_strides, dk_strides, dv_strides;
};

// --- 1. delta ------------------------------------------------------------------------------------

constexpr int kDeltaThreads = 128;
constexpr int kDeltaLanesPerRow = 8;  // 8 lanes x 16 bytes cover a 64-element row per pass
constexpr int kDeltaRowsPerBlock = 64;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kDeltaThreads) attention_bwd_delta_kernel(BwdParams p) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowsPerPass = kDeltaThreads / kDeltaLanesPerRow;
  const int64_t seq = blockIdx.z;
  const int64_t head = blockIdx.y;
  const Sequence sequence = sequence_of(p.shape, seq);
  const int lane_in_row = threadIdx.x % kDeltaLanesPerRow;
  for (int pass = 0; pass < kDeltaRowsPerBlock / kRowsPerPass; ++pass) {
    const int row = blockIdx.x * kDeltaRowsPerBlock + pass * kRowsPerPass +
                    static_cast<int>(threadIdx.x) / kDeltaLanesPerRow;
    // Uniform within the 8 lanes of a row, so the shuffles below see whole groups.
    const bool valid = row < sequence.length;
    float sum = 0.0f;
    if (valid) {
      const T* o = static_cast<const T*>(p.o) + token_offset(p.o_strides, seq, sequence, row, head);
      const T* d_out =
          static_cast<const T*>(p.d_out) + token_offset(p.do_strides, seq, sequence, row, head);
      for (int chunk = lane_in_row; chunk < kChunks; chunk += kDeltaLanesPerRow) {
        float o_vals[8], do_vals[8];
        load_as_float<8>(o + chunk * 8, o_vals);
        load_as_float<8>(d_out + chunk * 8, do_vals);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += o_vals[e] * do_vals[e];
      }
    }
#pragma unroll
    for (int offset = kDeltaLanesPerRow / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (valid && lane_in_row == 0) p.delta[lse_offset(p.shape, seq, sequence, row, head)] = sum;
  }
}

// --- 2. dK, dV -----------------------------------------------------------------------------------

template <typename T, int kHeadDim, int kBlockN, int kBlockM>
struct DkDvConfig {
  static constexpr int kWarps = kBlockN / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = TileGeometry<kHeadDim>::kPitch;
  // k and v tiles, two stages of (q, dO) tiles, then two stages of (lse, delta) rows in fp32.
  static constexpr size_t kTileBytes =
      static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * kPitch * sizeof(T);
  static constexpr size_t kSmemBytes = kTileBytes + 4 * kBlockM * sizeof(float);
};

template <typename T, int kHeadDim, int kBlockN, int kBlockM>
__global__ void __launch_bounds__(DkDvConfig<T, kHeadDim, kBlockN, kBlockM>::kThreads)
    attention_bwd_dkdv_kernel(BwdParams p) {
  using Config = DkDvConfig<T, kHeadDim, kBlockN, kBlockM>;
  constexpr int kPitch = Config::kPitch;
  const int64_t seq = blockIdx.z;
  const int64_t head = blockIdx.y;
  const Sequence sequence = sequence_of(p.shape, seq);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= sequence.length) return;

  DINOV2_FAST_DYNAMIC_SHARED(smem_bytes);
  T* k_tile = reinterpret_cast<T*>(smem_bytes);
  T* v_tile = k_tile + kBlockN * kPitch;
  T* q_do_stages = v_tile + kBlockN * kPitch;  // stage s: q at 2s, dO at 2s + 1 (kBlockM rows)
  float* row_stages = reinterpret_cast<float*>(smem_bytes + Config::kTileBytes);  // lse, delta

  const T* q = static_cast<const T*>(p.q) + token_offset(p.q_strides, seq, sequence, 0, head);
  const T* d_out =
      static_cast<const T*>(p.d_out) + token_offset(p.do_strides, seq, sequence, 0, head);
  const float* lse = p.lse + lse_offset(p.shape, seq, sequence, 0, head);
  const float* delta = p.delta + lse_offset(p.shape, seq, sequence, 0, head);
  const int query_tiles = (sequence.length + kBlockM - 1) / kBlockM;

  auto load_queries = [&](int tile, int stage) {
    const int m0 = tile * kBlockM;
    const int valid = sequence.length - m0;
    load_tile_async<T, kBlockM, kHeadDim, Config::kThreads>(
        q_do_stages + (2 * stage) * kBlockM * kPitch, q + m0 * p.q_strides.n, p.q_strides.n,
        valid);
    load_tile_async<T, kBlockM, kHeadDim, Config::kThreads>(
        q_do_stages + (2 * stage + 1) * kBlockM * kPitch, d_out + m0 * p.do_strides.n,
        p.do_strides.n, valid);
    // lse and delta with plain loads (their rows are not 16-byte aligned); pre-scaled to log2.
    float* rows = row_stages + stage * 2 * kBlockM;
    for (int i = threadIdx.x; i < kBlockM; i += Config::kThreads) {
      const bool ok = i < valid;
      rows[i] = ok ? lse[m0 + i] * kLog2e : INFINITY;
      rows[kBlockM + i] = ok ? delta[m0 + i] : 0.0f;
    }
  };

  load_tile_async<T, kBlockN, kHeadDim, Config::kThreads>(
      k_tile, static_cast<const T*>(p.k) + token_offset(p.k_strides, seq, sequence, n0, head),
      p.k_strides.n, sequence.length - n0);
  load_tile_async<T, kBlockN, kHeadDim, Config::kThreads>(
      v_tile, static_cast<const T*>(p.v) + token_offset(p.v_strides, seq, sequence, n0, head),
      p.v_strides.n, sequence.length - n0);
  load_queries(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const T* k_rows = k_tile + warp * 16 * kPitch;
  const T* v_rows = v_tile + warp * 16 * kPitch;
  const float scale_log2 = p.shape.scale * kLog2e;
  // Keys of this warp past the sequence's end (rows lane / 4 and lane / 4 + 8).
  const int valid_keys = sequence.length - n0 - warp * 16;
  const bool key_ok[2] = {lane / 4 < valid_keys, lane / 4 + 8 < valid_keys};
  // Idle warps of a ragged last block still copy and meet the barriers.
  const bool warp_has_keys = valid_keys > 0;

  float dk_acc[kHeadDim / 8][4];
  float dv_acc[kHeadDim / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  for (int tile = 0; tile < query_tiles; ++tile) {
    const int stage = tile % 2;
    advance_pipeline(tile + 1 < query_tiles, [&] { load_queries(tile + 1, 1 - stage); });
    const T* q_tile = q_do_stages + (2 * stage) * kBlockM * kPitch;
    const T* do_tile = q_do_stages + (2 * stage + 1) * kBlockM * kPitch;
    const float* lse_log2 = row_stages + stage * 2 * kBlockM;
    const float* delta_rows = lse_log2 + kBlockM;

    if (warp_has_keys) {
      // A ragged last tile skips its 16-query steps with no query (queries past the end have
      // lse = +inf, so P is 0 there whatever the product left in pt).
      const int valid_queries = sequence.length - tile * kBlockM;

      // P^T [16 keys x kBlockM queries]: column c is query c of the tile.
      float pt[kBlockM / 8][4];
      zero(pt);
      mma_rows_by_rows<T, kBlockM, kHeadDim, kPitch>(pt, k_rows, q_tile, valid_queries);
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + (lane % 4) * 2 + (e % 2);
          pt[j][e] = key_ok[e / 2] ? exp2f(pt[j][e] * scale_log2 - lse_log2[col]) : 0.0f;
        }
      }
      uint32_t operand[kBlockM / 16][4];
      accumulators_to_operand<T, kBlockM>(pt, operand);
      mma_regs_by_rows<T, kHeadDim, kBlockM, kPitch>(dv_acc, operand, do_tile, valid_queries);

      // dS^T = P^T * (v dO^T - delta), reusing dpt in place.
      float dpt[kBlockM / 8][4];
      zero(dpt);
      mma_rows_by_rows<T, kBlockM, kHeadDim, kPitch>(dpt, v_rows, do_tile, valid_queries);
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + (lane % 4) * 2 + (e % 2);
          dpt[j][e] = pt[j][e] * (dpt[j][e] - delta_rows[col]);
        }
      }
      accumulators_to_operand<T, kBlockM>(dpt, operand);
      mma_regs_by_rows<T, kHeadDim, kBlockM, kPitch>(dk_acc, operand, q_tile, valid_queries);
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
  }

  const float dk_factor[2] = {p.shape.scale, p.shape.scale};
  const float dv_factor[2] = {1.0f, 1.0f};
  T* dk = static_cast<T*>(p.dk) + token_offset(p.dk_strides, seq, sequence, n0 + warp * 16, head);
  T* dv = static_cast<T*>(p.dv) + token_offset(p.dv_strides, seq, sequence, n0 + warp * 16, head);
  store_rows<T, kHeadDim>(dk_acc, dk_factor, dk, p.dk_strides.n, valid_keys);
  store_rows<T, kHeadDim>(dv_acc, dv_factor, dv, p.dv_strides.n, valid_keys);
}

// --- 3. dQ ---------------------------------------------------------------------------------------

template <typename T, int kHeadDim, int kBlockM, int kBlockN>
struct DqConfig {
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = TileGeometry<kHeadDim>::kPitch;
  // q and dO tiles, then two stages of (k, v) tiles.
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(2 * kBlockM + 4 * kBlockN) * kPitch * sizeof(T);
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(DqConfig<T, kHeadDim, kBlockM, kBlockN>::kThreads)
    attention_bwd_dq_kernel(BwdParams p) {
  using Config = DqConfig<T, kHeadDim, kBlockM, kBlockN>;
  constexpr int kPitch = Config::kPitch;
  const int64_t seq = blockIdx.z;
  const int64_t head = blockIdx.y;
  const Sequence sequence = sequence_of(p.shape, seq);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= sequence.length) return;

  DINOV2_FAST_DYNAMIC_SHARED(smem_bytes);
  T* q_tile = reinterpret_cast<T*>(smem_bytes);
  T* do_tile = q_tile + kBlockM * kPitch;
  T* kv_stages = do_tile + kBlockM * kPitch;  // stage s: k at 2s, v at 2s + 1 (kBlockN rows)

  const T* k = static_cast<const T*>(p.k) + token_offset(p.k_strides, seq, sequence, 0, head);
  const T* v = static_cast<const T*>(p.v) + token_offset(p.v_strides, seq, sequence, 0, head);
  const int key_tiles = (sequence.length + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int tile, int stage) {
    load_key_value_tiles<T, kBlockN, kHeadDim, Config::kThreads>(
        kv_stages, stage, tile, sequence.length, k, p.k_strides.n, v, p.v_strides.n);
  };

  const int valid_queries = sequence.length - m0;
  load_tile_async<T, kBlockM, kHeadDim, Config::kThreads>(
      q_tile, static_cast<const T*>(p.q) + token_offset(p.q_strides, seq, sequence, m0, head),
      p.q_strides.n, valid_queries);
  load_tile_async<T, kBlockM, kHeadDim, Config::kThreads>(
      do_tile,
      static_cast<const T*>(p.d_out) + token_offset(p.do_strides, seq, sequence, m0, head),
      p.do_strides.n, valid_queries);
  load_kv(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const T* q_rows = q_tile + warp * 16 * kPitch;
  const T* do_rows = do_tile + warp * 16 * kPitch;
  const float scale_log2 = p.shape.scale * kLog2e;
  // This thread's two query rows: lse in log2 units (+inf past the end: P = 0) and delta.
  float lse_log2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = m0 + warp * 16 + lane / 4 + half * 8;
    const bool ok = row < sequence.length;
    const int64_t at = lse_offset(p.shape, seq, sequence, ok ? row : 0, head);
    lse_log2[half] = ok ? p.lse[at] * kLog2e : INFINITY;
    delta[half] = ok ? p.delta[at] : 0.0f;
  }

  float dq_acc[kHeadDim / 8][4];
  zero(dq_acc);
  // Idle warps of a ragged last block still copy and meet the barriers.
  const bool warp_has_rows = valid_queries > warp * 16;

  for (int tile = 0; tile < key_tiles; ++tile) {
    const int stage = tile % 2;
    advance_pipeline(tile + 1 < key_tiles, [&] { load_kv(tile + 1, 1 - stage); });
    const T* k_tile = kv_stages + (2 * stage) * kBlockN * kPitch;
    const T* v_tile = kv_stages + (2 * stage + 1) * kBlockN * kPitch;
    const int valid_keys = sequence.length - tile * kBlockN;
    if (warp_has_rows) {
      // A ragged last tile skips its 16-key steps with no key.
      float s[kBlockN / 8][4];
      zero(s);
      mma_rows_by_rows<T, kBlockN, kHeadDim, kPitch>(s, q_rows, k_tile, valid_keys);
      float dp[kBlockN / 8][4];
      zero(dp);
      mma_rows_by_rows<T, kBlockN, kHeadDim, kPitch>(dp, do_rows, v_tile, valid_keys);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const bool key_ok = j * 8 + (lane % 4) * 2 + (e % 2) < valid_keys;
          // Padded keys: exp of (0 - lse) may overflow, so select instead of multiplying.
          const float prob = key_ok ? exp2f(s[j][e] * scale_log2 - lse_log2[half]) : 0.0f;
          s[j][e] = prob * (dp[j][e] - delta[half]);
        }
      }
      uint32_t operand[kBlockN / 16][4];
      accumulators_to_operand<T, kBlockN>(s, operand);
      mma_regs_by_rows<T, kHeadDim, kBlockN, kPitch>(dq_acc, operand, k_tile, valid_keys);
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
  }

  const float factor[2] = {p.shape.scale, p.shape.scale};
  T* dq = static_cast<T*>(p.dq) + token_offset(p.dq_strides, seq, sequence, m0 + warp * 16, head);
  store_rows<T, kHeadDim>(dq_acc, factor, dq, p.dq_strides.n, valid_queries - warp * 16);
}

// --- launchers -----------------------------------------------------------------------------------

unsigned grid_blocks(int64_t rows, int block) {
  return static_cast<unsigned>((rows + block - 1) / block);
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  const AttentionShape& s = p.shape;
  const dim3 per_row_block(1, static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch));

  dim3 grid = per_row_block;
  grid.x = grid_blocks(s.seqlen, kDeltaRowsPerBlock);
  DINOV2_FAST_CHECK_CUDA(launch_kernel(attention_bwd_delta_kernel<T, kHeadDim>, grid,
                                       dim3(kDeltaThreads), 0, stream, p));

  // Up to D = 64 a warp's fp32 products fit 64-wide tiles; above, 32-wide ones keep dK, dV (or
  // dQ) and two score tiles in registers without spilling.
  constexpr int kTile = kHeadDim <= 64 ? 64 : 32;
  {
    constexpr int kBlockN = 64;
    using Config = DkDvConfig<T, kHeadDim, kBlockN, kTile>;
    auto kernel = attention_bwd_dkdv_kernel<T, kHeadDim, kBlockN, kTile>;
    DINOV2_FAST_CHECK_CUDA(set_max_dynamic_shared_memory(kernel, Config::kSmemBytes));
    grid.x = grid_blocks(s.seqlen, kBlockN);
    DINOV2_FAST_CHECK_CUDA(
        launch_kernel(kernel, grid, dim3(Config::kThreads), Config::kSmemBytes, stream, p));
  }
  {
    constexpr int kBlockM = 64;
    using Config = DqConfig<T, kHeadDim, kBlockM, kTile>;
    auto kernel = attention_bwd_dq_kernel<T, kHeadDim, kBlockM, kTile>;
    DINOV2_FAST_CHECK_CUDA(set_max_dynamic_shared_memory(kernel, Config::kSmemBytes));
    grid.x = grid_blocks(s.seqlen, kBlockM);
    return launch_kernel(kernel, grid, dim3(Config::kThreads), Config::kSmemBytes, stream, p);
  }
}

}  // namespace

cudaError_t attention_bwd(const AttentionShape& shape, const void* d_out, TokenStrides do_strides,
                          const void* q, TokenStrides q_strides, const void* k,
                          TokenStrides k_strides, const void* v, TokenStrides v_strides,
                          const void* o, TokenStrides o_strides, const float* lse, float* delta,
                          void* dq, TokenStrides dq_strides, void* dk, TokenStrides dk_strides,
                          void* dv, TokenStrides dv_strides, cudaStream_t stream) {
  if (!attention_arguments_ok(shape) || !copy_source_ok(d_out, do_strides) ||
      !copy_source_ok(q, q_strides) || !copy_source_ok(k, k_strides) ||
      !copy_source_ok(v, v_strides) || !copy_source_ok(o, o_strides) ||
      !pair_store_ok(dq, dq_strides) || !pair_store_ok(dk, dk_strides) ||
      !pair_store_ok(dv, dv_strides)) {
    return cudaErrorInvalidValue;
  }
  if (shape.batch == 0 || shape.seqlen == 0 || shape.heads == 0) return cudaSuccess;
  const BwdParams params{shape,      d_out,     q,         k,         v,          o,
                         lse,        delta,     dq,        dk,        dv,         do_strides,
                         q_strides,  k_strides, v_strides, o_strides, dq_strides, dk_strides,
                         dv_strides};
  return with_element_type(shape.dtype, [&](auto element) {
    return with_head_dim(shape.head_dim, [&](auto head_dim) {
      return launch_bwd<decltype(element), decltype(head_dim)::value>(params, stream);
    });
  });
}

}  // namespace dinov2_fast
