// Shared pieces of the torch-free CUDA ops: dtype tags, float conversion, vector access,
// reductions and error checks. Host code (bindings.cpp) sees only the tags and the checks.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dinov2_fast {

// The tag Python passes for a tensor's dtype. The integers are part of the Python interface.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline bool is_valid_dtype_tag(int64_t tag) { return tag >= 0 && tag <= 2; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

// Returns the error of a CUDA call from the enclosing function, which returns cudaError_t.
#define DINOV2_FAST_CHECK_CUDA(expr)            \
  do {                                          \
    const cudaError_t status_ = (expr);         \
    if (status_ != cudaSuccess) return status_; \
  } while (0)

// Reports a bad launch configuration (or an earlier sticky error) right after a <<<...>>> launch.
inline cudaError_t check_launch() { return cudaGetLastError(); }

#if defined(__CUDACC__) && !defined(DINOV2_FAST_EMULATE)
// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns the launch's status.
// Every launch in csrc/ goes through here, so the CPU emulator of the tests can run the same code.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}

// Opts a kernel into more than 48 KiB of dynamic shared memory (needed before such a launch).
template <typename... Params>
cudaError_t set_max_dynamic_shared_memory(void (*kernel)(Params...), size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}
#endif

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace dinov2_fast

#if defined(DINOV2_FAST_EMULATE)
// The tests' CPU emulator (tests/cuda_emulator/): it defines the CUDA built-ins, launch_kernel,
// set_max_dynamic_shared_memory and DINOV2_FAST_DYNAMIC_SHARED for host compilers.
#include "emulate.h"
#endif

#if defined(__CUDACC__) || defined(DINOV2_FAST_EMULATE)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Runs the statements in __VA_ARGS__ with T aliased to the C++ type of the tag; an unknown tag
// returns cudaErrorInvalidValue from the enclosing function.
#define DINOV2_FAST_DTYPE_SWITCH(tag, T, ...)     \
  switch (tag) {                                  \
    case ::dinov2_fast::DType::kFloat32: {        \
      using T = float;                            \
      __VA_ARGS__;                                \
    } break;                                      \
    case ::dinov2_fast::DType::kFloat16: {        \
      using T = __half;                           \
      __VA_ARGS__;                                \
    } break;                                      \
    case ::dinov2_fast::DType::kBFloat16: {       \
      using T = __nv_bfloat16;                    \
      __VA_ARGS__;                                \
    } break;                                      \
    default:                                      \
      return cudaErrorInvalidValue;               \
  }

#if !defined(DINOV2_FAST_EMULATE)
// Declares `char* name`, the block's dynamic shared memory (128-byte aligned).
#define DINOV2_FAST_DYNAMIC_SHARED(name)                  \
  extern __shared__ __align__(128) char name##_storage[]; \
  char* name = name##_storage
#endif

namespace dinov2_fast {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxWarpsPerBlock = kMaxThreadsPerBlock / kWarpSize;

// All math is fp32: convert on load, round to nearest on store.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Bytes a kN-element access of T must be aligned to: its size, capped at one 16-byte transaction
// (a wider vector is split into 16-byte loads, so 16 is enough).
template <typename T, int kN>
constexpr int vec_alignment() {
  return kN * sizeof(T) < 16 ? static_cast<int>(kN * sizeof(T)) : 16;
}

// Whether kN-element vectors of T can serve every access of rows that start at ptr and step by
// `strides` (elements): ptr aligned to the vector, every stride a whole number of vectors. An
// absent (null) pointer needs nothing. Host code: the launchers pick the vector or scalar kernel.
template <typename T, int kN, typename... Strides>
bool vector_access_ok(const void* ptr, Strides... strides) {
  return ptr == nullptr ||
         (((strides % kN == 0) && ...) && is_aligned(ptr, vec_alignment<T, kN>()));
}

template <typename T, int kN>
struct alignas(vec_alignment<T, kN>()) AlignedVec {
  T data[kN];
};

// The unsigned type of a 2, 4, 8 or 16-byte memory transaction.
template <int kBytes>
struct Word;
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

// Copies a vector as whole words: the compiler does not always merge element-wise copies of
// 16-bit types into one wide access.
template <typename T, int kN>
__device__ __forceinline__ void copy_vec(AlignedVec<T, kN>* dst, const AlignedVec<T, kN>* src) {
  constexpr int kWordBytes = vec_alignment<T, kN>();
  using W = typename Word<kWordBytes>::type;
  constexpr int kWords = static_cast<int>(kN * sizeof(T)) / kWordBytes;
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    reinterpret_cast<W*>(dst)[w] = reinterpret_cast<const W*>(src)[w];
  }
}

// Loads kN consecutive elements at ptr (aligned to vec_alignment<T, kN>()) as floats.
template <int kN, typename T>
__device__ __forceinline__ void load_as_float(const T* ptr, float (&out)[kN]) {
  AlignedVec<T, kN> v;
  copy_vec(&v, reinterpret_cast<const AlignedVec<T, kN>*>(ptr));
#pragma unroll
  for (int j = 0; j < kN; ++j) out[j] = to_float(v.data[j]);
}

// Stores kN floats as consecutive elements of T at ptr (aligned to vec_alignment<T, kN>()).
template <int kN, typename T>
__device__ __forceinline__ void store_from_float(T* ptr, const float (&in)[kN]) {
  AlignedVec<T, kN> v;
#pragma unroll
  for (int j = 0; j < kN; ++j) v.data[j] = from_float<T>(in[j]);
  copy_vec(reinterpret_cast<AlignedVec<T, kN>*>(ptr), &v);
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a in IEEE arithmetic).
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float2 warp_reduce_sum(float2 v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  return v;
}

__device__ __forceinline__ float2 operator+(float2 a, float2 b) {
  return make_float2(a.x + b.x, a.y + b.y);
}

// Sums v over a group of warps_per_group consecutive warps (a block holds several groups, e.g.
// one per row) and returns the total to every thread of the group, in a fixed order.
// warps_per_group must be the same for the whole block and every thread of the block must call
// this (it synchronises when a group spans several warps). smem holds kMaxWarpsPerBlock values.
template <typename T>
__device__ __forceinline__ T group_reduce_sum(T v, int warps_per_group, T* smem) {
  v = warp_reduce_sum(v);
  if (warps_per_group == 1) return v;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) smem[warp] = v;
  __syncthreads();
  const T* group = smem + (warp / warps_per_group) * warps_per_group;
  T total = group[0];
  for (int w = 1; w < warps_per_group; ++w) total = total + group[w];
  // smem is reused by the next call.
  __syncthreads();
  return total;
}

}  // namespace dinov2_fast

#endif  // defined(__CUDACC__) || defined(DINOV2_FAST_EMULATE)
