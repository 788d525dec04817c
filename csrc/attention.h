// Softmax attention (non-causal), forward and backward, on raw device pointers: FlashAttention-2's
// algorithm on mma.sync tensor cores (sm_80 and newer), fp16 and bf16.
//
// Layouts, read through strides in elements (unit stride along D is assumed):
//   dense:  q, k, v, o, do, dq, dk, dv [B, N, H, D] (strides b, n, h); lse, delta [B, H, N]
//   varlen: the same tensors [T, H, D] holding S sequences back to back (cu_seqlens: int32
//           [S + 1] offsets on the device; pass stride b = 0), lse, delta [H, T] (stride b = 0)
// A token attends to the keys of its own sequence only. lse is the natural-log sum of the
// exponentials of the scaled scores, fp32, as flash-attn's softmax_lse.
//
// Requirements the launchers check (cudaErrorInvalidValue otherwise): head_dim in
// kAttentionHeadDims; dtype float16 or bfloat16; q, k, v, do pointers 16-byte aligned and their
// b, n, h strides multiples of 8 elements (16-byte cp.async copies); o, dq, dk, dv 4-byte aligned
// with even strides; batch and heads at most 65535 (grid axes); seqlen >= 0.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace dinov2_fast {

// Head dims with compiled kernels (multiples of 16: the k step of mma.m16n8k16).
constexpr int kAttentionHeadDims[] = {32, 64, 80, 96, 128};

inline bool is_attention_head_dim(int64_t head_dim) {
  for (int d : kAttentionHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

// Strides in elements of one [B, N, H, D] (or [T, H, D] with b = 0) tensor.
struct TokenStrides {
  int64_t b, n, h;
};

struct AttentionShape {
  const int32_t* cu_seqlens;  // null for dense inputs
  int64_t batch;              // B, or S sequences
  int64_t seqlen;             // N, or the longest sequence (max_seqlen)
  int64_t heads;
  int64_t head_dim;
  int64_t lse_stride_b;  // lse and delta: [B, H, N] or [H, T]; unit stride along tokens
  int64_t lse_stride_h;
  float scale;  // the softmax scale, > 0
  DType dtype;
};

// o = softmax(scale * q k^T) v per sequence and head; also writes lse.
cudaError_t attention_fwd(const AttentionShape& shape, const void* q, TokenStrides q_strides,
                          const void* k, TokenStrides k_strides, const void* v,
                          TokenStrides v_strides, void* o, TokenStrides o_strides, float* lse,
                          cudaStream_t stream);

// dq, dk, dv from do, the inputs and the forward's o and lse. delta is an fp32 workspace laid out
// as lse (same strides) that the first of three launches fills with rowsum(do * o). No atomics:
// the result is the same on every run.
cudaError_t attention_bwd(const AttentionShape& shape, const void* d_out, TokenStrides do_strides,
                          const void* q, TokenStrides q_strides, const void* k,
                          TokenStrides k_strides, const void* v, TokenStrides v_strides,
                          const void* o, TokenStrides o_strides, const float* lse, float* delta,
                          void* dq, TokenStrides dq_strides, void* dk, TokenStrides dk_strides,
                          void* dv, TokenStrides dv_strides, cudaStream_t stream);

}  // namespace dinov2_fast
