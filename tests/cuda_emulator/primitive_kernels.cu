// The test kernels of primitive_kernels.h.
#include "primitive_kernels.h"

#include "mma.h"

namespace dinov2_fast {
namespace test {
namespace {

__global__ void ldmatrix_kernel(const uint16_t* tile, int tile_elems, const int32_t* row_offsets,
                                int variant, uint32_t* out) {
  DINOV2_FAST_DYNAMIC_SHARED(smem);
  uint16_t* shared_tile = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < tile_elems; i += blockDim.x) shared_tile[i] = tile[i];
  __syncthreads();
  const int lane = threadIdx.x;
  const uint16_t* row = shared_tile + row_offsets[lane];
  uint32_t r[4];
  int count = 4;
  switch (variant) {
    case 0:
      ldmatrix_x4(r, row);
      break;
    case 1:
      ldmatrix_x4_trans(r, row);
      break;
    case 2: {
      uint32_t r2[2];
      ldmatrix_x2(r2, row);
      r[0] = r2[0];
      r[1] = r2[1];
      count = 2;
    } break;
    default: {
      uint32_t r2[2];
      ldmatrix_x2_trans(r2, row);
      r[0] = r2[0];
      r[1] = r2[1];
      count = 2;
    } break;
  }
  for (int i = 0; i < count; ++i) out[lane * 4 + i] = r[i];
}

template <typename T>
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  uint32_t af[4], bf[2];
  float cf[4], df[4];
  for (int i = 0; i < 4; ++i) af[i] = a[lane * 4 + i];
  for (int i = 0; i < 2; ++i) bf[i] = b[lane * 2 + i];
  for (int i = 0; i < 4; ++i) cf[i] = c[lane * 4 + i];
  mma_m16n8k16<T>(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = df[i];
}

template <typename T>
__device__ T shuffle(int mode, uint32_t mask, T v, int arg, int width) {
  switch (mode) {
    case 0:
      return __shfl_sync(mask, v, arg, width);
    case 1:
      return __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
    case 2:
      return __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
    default:
      return __shfl_xor_sync(mask, v, arg, width);
  }
}

__global__ void shuffle_kernel(const uint32_t* in, const int32_t* args, uint32_t* out, int mode,
                               int width, uint32_t mask, bool as_float) {
  const int i = threadIdx.x;
  uint32_t result = in[i];
  if (mask >> (i % kWarpSize) & 1u) {
    if (as_float) {
      result = __float_as_uint(shuffle(mode, mask, __uint_as_float(in[i]), args[i], width));
    } else {
      result = shuffle(mode, mask, in[i], args[i], width);
    }
  }
  out[i] = result;
}

__global__ void vote_kernel(const int32_t* predicate, uint32_t* out, uint32_t mask) {
  const int i = threadIdx.x;
  uint32_t ballot = 0, any = 0, all = 0;
  if (mask >> (i % kWarpSize) & 1u) {
    ballot = __ballot_sync(mask, predicate[i]);
    any = __any_sync(mask, predicate[i]);
    all = __all_sync(mask, predicate[i]);
  }
  out[3 * i] = ballot;
  out[3 * i + 1] = any;
  out[3 * i + 2] = all;
}

__global__ void indices_kernel(int32_t* out) {
  __shared__ int32_t values[kMaxThreadsPerBlock];
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  values[t] = 7 * t + 1000 * block;
  const int odd = __syncthreads_count(t % 2);
  int32_t* o = out + 8 * (static_cast<int64_t>(block) * threads + t);
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
  o[6] = values[(t + 1) % threads];
  o[7] = odd;
}

__global__ void cp_async_kernel(const uint8_t* src, const int32_t* src_bytes, uint8_t* out) {
  DINOV2_FAST_DYNAMIC_SHARED(smem);
  out += 64 * blockIdx.x;
  cp_async_16(smem, src, src_bytes[0]);
  cp_async_commit();
  cp_async_16(smem + 16, src + 16, src_bytes[1]);
  cp_async_commit();
  cp_async_wait<1>();
  for (int i = 0; i < 32; ++i) out[i] = static_cast<uint8_t>(smem[i]);
  cp_async_wait<0>();
  for (int i = 0; i < 32; ++i) out[32 + i] = static_cast<uint8_t>(smem[i]);
}

__global__ void fresh_shared_kernel(uint32_t* out) {
  DINOV2_FAST_DYNAMIC_SHARED(smem);
  uint32_t* word = reinterpret_cast<uint32_t*>(smem);
  out[blockIdx.x] = *word;
  *word = 0;
}

__global__ void local_array_kernel(float* out) {
  float values[16384];
  for (int i = 0; i < 16384; ++i) values[i] = static_cast<float>((i * 7 + threadIdx.x) % 13);
  float sum = 0.f;
  for (int i = 0; i < 16384; i += 3) sum += values[i];
  out[threadIdx.x] = sum;
}

// Kinds of misuse, one warp (kind 6: a warp and a half) and 256 bytes of dynamic shared memory.
enum Misuse : int {
  kDivergentCollectives = 0,  // lanes 0-15 shuffle while lanes 16-31 call __syncwarp
  kBarrierAfterReturn = 1,    // thread 0 returns, the others wait at __syncthreads
  kDeadlock = 2,              // thread 0 waits at __syncthreads, the others at a shuffle
  kMisalignedLdmatrix = 3,    // row addresses 2 bytes off 16-byte alignment
  kLdmatrixFromLocal = 4,     // row addresses in a local array
  kLdmatrixOutOfBounds = 5,   // rows past the end of the dynamic shared memory
  kLdmatrixPartialWarp = 6,   // a warp of 16 threads
  kLaneNotInMask = 7,         // a lane shuffles with a mask that leaves it out
  kMisalignedCpAsync = 8,     // cp_async_16 from a source 4 bytes off alignment
  kReturnDuringShuffle = 9,   // lanes 16-31 return while lanes 0-15 shuffle with a full mask
  kMisuseCount = 10,
};

__global__ void misuse_kernel(int kind, const float* global) {
  DINOV2_FAST_DYNAMIC_SHARED(smem);
  const int lane = threadIdx.x % kWarpSize;
  float v = static_cast<float>(lane);
  uint32_t r[4];
  switch (kind) {
    case kDivergentCollectives:
      if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      } else {
        __syncwarp();
      }
      break;
    case kBarrierAfterReturn:
      if (threadIdx.x == 0) return;
      __syncthreads();
      break;
    case kDeadlock:
      if (threadIdx.x == 0) {
        __syncthreads();
      } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      }
      break;
    case kMisalignedLdmatrix:
      ldmatrix_x4(r, smem + 16 * lane + 2);
      break;
    case kLdmatrixFromLocal: {
      uint16_t local[64];
      for (int i = 0; i < 64; ++i) local[i] = static_cast<uint16_t>(i);
      ldmatrix_x4(r, local + 8 * (lane % 8));
      v = static_cast<float>(local[lane]);
    } break;
    case kLdmatrixOutOfBounds:
      ldmatrix_x4(r, smem + 256 + 16 * lane);
      break;
    case kLdmatrixPartialWarp:
      ldmatrix_x4(r, smem + 16 * (lane % 16));
      break;
    case kLaneNotInMask:
      v = __shfl_sync(lane == 5 ? 0x1u : 0xffffffffu, v, 0);
      break;
    case kMisalignedCpAsync:
      cp_async_16(smem + 16 * lane, global + 1, 16);
      cp_async_commit();
      cp_async_wait<0>();
      break;
    case kReturnDuringShuffle:
      if (lane >= 16) return;
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    default:
      break;
  }
  if (v < -1.f) smem[0] = static_cast<char>(r[0]);  // keep v and r live
}

__global__ void empty_kernel(int /*unused*/) {}

}  // namespace

cudaError_t run_ldmatrix(const uint16_t* tile, int tile_elems, const int32_t* row_offsets,
                         int variant, uint32_t* out, cudaStream_t stream) {
  return launch_kernel(ldmatrix_kernel, 1, kWarpSize, tile_elems * sizeof(uint16_t), stream, tile,
                       tile_elems, row_offsets, variant, out);
}

cudaError_t run_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, int dtype,
                    cudaStream_t stream) {
  if (dtype == static_cast<int>(DType::kFloat16)) {
    return launch_kernel(mma_kernel<__half>, 1, kWarpSize, 0, stream, a, b, c, d);
  }
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    return launch_kernel(mma_kernel<__nv_bfloat16>, 1, kWarpSize, 0, stream, a, b, c, d);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_shuffle(const uint32_t* in, const int32_t* args, uint32_t* out, int threads,
                        int mode, int width, uint32_t mask, bool as_float, cudaStream_t stream) {
  return launch_kernel(shuffle_kernel, 1, threads, 0, stream, in, args, out, mode, width, mask,
                       as_float);
}

cudaError_t run_vote(const int32_t* predicate, uint32_t* out, int threads, uint32_t mask,
                     cudaStream_t stream) {
  return launch_kernel(vote_kernel, 1, threads, 0, stream, predicate, out, mask);
}

cudaError_t run_indices(dim3 grid, dim3 block, int32_t* out, cudaStream_t stream) {
  return launch_kernel(indices_kernel, grid, block, 0, stream, out);
}

cudaError_t run_cp_async(const uint8_t* src, const int32_t* src_bytes, uint8_t* out,
                         cudaStream_t stream) {
  return launch_kernel(cp_async_kernel, 4, 1, 32, stream, src, src_bytes, out);
}

cudaError_t run_fresh_shared(int blocks, uint32_t* out, cudaStream_t stream) {
  return launch_kernel(fresh_shared_kernel, blocks, 1, 16, stream, out);
}

cudaError_t run_local_array(int threads, float* out, cudaStream_t stream) {
  return launch_kernel(local_array_kernel, 1, threads, 0, stream, out);
}

cudaError_t run_misuse(int kind, cudaStream_t stream) {
  if (kind < 0 || kind >= kMisuseCount) return cudaErrorInvalidValue;
  // A 16-byte aligned "global" buffer for cp_async_16.
  static float global[8] __attribute__((aligned(16)));
  const int threads = kind == kLdmatrixPartialWarp ? kWarpSize + 16 : kWarpSize;
  return launch_kernel(misuse_kernel, 1, threads, 256, stream, kind, global);
}

cudaError_t run_config(int threads, size_t smem_bytes, size_t opt_in_bytes, cudaStream_t stream) {
  DINOV2_FAST_CHECK_CUDA(
      set_max_dynamic_shared_memory(empty_kernel, opt_in_bytes > 0 ? opt_in_bytes : 48 << 10));
  return launch_kernel(empty_kernel, 1, threads, smem_bytes, stream, 0);
}

}  // namespace test
}  // namespace dinov2_fast
