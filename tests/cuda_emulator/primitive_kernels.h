// Tiny kernels that each exercise one CUDA primitive, for tests/test_cuda_emulator.py. They are
// real CUDA (a test compiles them with nvcc for sm_80) and run on the CPU emulator. Launchers
// take device (under the emulator: host) addresses, as csrc/'s do. Tests compare the results
// with an independent reading of the CUDA and PTX documentation.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace dinov2_fast {
namespace test {

// One warp copies `tile` (tile_elems 16-bit elements) to dynamic shared memory and loads from
// it with ldmatrix variant 0 (x4), 1 (x4 trans), 2 (x2) or 3 (x2 trans), lane l pointing at
// element row_offsets[l] of the copy. out: [32][4] registers (x2 leaves 2 and 3 untouched).
cudaError_t run_ldmatrix(const uint16_t* tile, int tile_elems, const int32_t* row_offsets,
                         int variant, uint32_t* out, cudaStream_t stream);

// One warp computes d = a b + c with mma_m16n8k16, dtype 1 (float16) or 2 (bfloat16); a [32][4],
// b [32][2], c and d [32][4] are the lanes' fragments.
cudaError_t run_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, int dtype,
                    cudaStream_t stream);

// One block of `threads`: thread i calls shuffle `mode` (0 __shfl_sync, 1 __shfl_up_sync,
// 2 __shfl_down_sync, 3 __shfl_xor_sync) on in[i] (as a float when as_float, else as an
// unsigned int) with lane argument args[i], `width` and `mask`, if its lane is in the mask;
// out[i] is the result, or in[i] for lanes outside the mask.
cudaError_t run_shuffle(const uint32_t* in, const int32_t* args, uint32_t* out, int threads,
                        int mode, int width, uint32_t mask, bool as_float, cudaStream_t stream);

// One block of `threads`: the lanes in `mask` vote on predicate[i]; out[3 i .. 3 i + 2] are
// __ballot_sync, __any_sync and __all_sync (0 for lanes outside the mask).
cudaError_t run_vote(const int32_t* predicate, uint32_t* out, int threads, uint32_t mask,
                     cudaStream_t stream);

// Every thread (linear index g over the grid, x fastest, threads before blocks) writes
// out[8 g .. 8 g + 7] = threadIdx.xyz, blockIdx.xyz, the value its successor in the block
// (t + 1 mod threads) stored in shared memory before a __syncthreads (7 t + 1000 * linear block
// index), and __syncthreads_count of (t odd).
cudaError_t run_indices(dim3 grid, dim3 block, int32_t* out, cudaStream_t stream);

// Four blocks of one thread: cp_async_16 of src[0..16) (src_bytes[0] bytes) and src[16..32)
// (src_bytes[1]) into shared memory, one commit group each; block b writes out[64b, 64b + 32),
// shared memory after cp_async_wait<1>, and out[64b + 32, 64b + 64), after cp_async_wait<0>.
cudaError_t run_cp_async(const uint8_t* src, const int32_t* src_bytes, uint8_t* out,
                         cudaStream_t stream);

// `blocks` blocks of one thread each: out[b] is the first word of the block's dynamic shared
// memory before the thread writes it (the emulator poisons it to 0xffffffff at block start).
cudaError_t run_fresh_shared(int blocks, uint32_t* out, cudaStream_t stream);

// Each thread of one block fills a local array of 16384 floats (64 KiB) and writes its sum.
cudaError_t run_local_array(int threads, float* out, cudaStream_t stream);

// Misuses the emulator reports as launch failures (on a GPU: undefined behaviour or a hang, so
// never run there). See primitive_kernels.cu for the kinds.
cudaError_t run_misuse(int kind, cudaStream_t stream);

// An empty kernel launched with `threads` threads and smem_bytes of dynamic shared memory after
// opting in to opt_in_bytes (0: the default 48 KiB).
cudaError_t run_config(int threads, size_t smem_bytes, size_t opt_in_bytes, cudaStream_t stream);

}  // namespace test
}  // namespace dinov2_fast
