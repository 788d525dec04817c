// A CPU emulator of the CUDA that csrc/ uses, so that the tests run the kernels without a GPU.
//
// csrc/common.h includes this header when DINOV2_FAST_EMULATE is defined; the .cu files then
// compile with g++ as host code (tests/cuda_emulator/__init__.py builds them). It provides:
//   - the CUDA keywords and built-in variables (threadIdx, blockIdx, blockDim, gridDim) for a
//     host compiler; __half and __nv_bfloat16 come from the real cuda_fp16.h and cuda_bf16.h,
//   - launch_kernel, set_max_dynamic_shared_memory and DINOV2_FAST_DYNAMIC_SHARED (common.h),
//   - barriers, warp shuffles and votes, atomics, the math intrinsics the kernels call,
//   - the warp-level tensor-core primitives of csrc/mma.h (ldmatrix, mma.sync, cp.async) with
//     the PTX ISA's fragment layouts,
//   - the few CUDA runtime calls the launchers make, so that nothing links against libcudart.
//
// Execution model: a launch runs its blocks one after another on the calling OS thread. Every
// CUDA thread of a block is a fiber (its own stack, switched with _setjmp/_longjmp, which cost
// about 10 ns where swapcontext costs a system call), so a thread runs until it reaches a
// barrier or a warp collective and then yields. A warp collective completes when all its lanes
// have arrived: the last one computes every lane's result from the inputs the lanes posted.
// Warps run one at a time up to the next __syncthreads, in increasing order in even blocks and
// decreasing order in odd ones (see run_block): runs are deterministic, and a missing barrier
// shows up as a read of shared memory that is not written yet.
//
// What is reported as a launch failure (cudaErrorLaunchFailure, with the details in
// cudaGetErrorString and on stderr) instead of hanging or silently working: __syncthreads
// after some threads of the block exited, a warp collective that not all its lanes reach or
// that lanes reach with different masks or kinds (divergence), ldmatrix or mma in a partial
// warp, deadlock, and ldmatrix/cp.async addresses that are misaligned, on a thread's stack or
// outside the launch's dynamic shared memory. Dynamic shared memory is filled with 0xff bytes
// (NaN in fp32, fp16 and bf16) at the start of every block, and cp.async copies land only at
// the matching cp_async_wait (or, in half of the blocks, at once: see run_block), so reading
// either too early, or refilling a buffer too early, shows up in the results. Static
// __shared__ variables are plain statics: they start at zero and keep the previous block's
// values (g++ cannot gather them for poisoning).
//
// Not emulated: concurrency between blocks (a kernel that waits for another block hangs),
// memory errors in global memory, assert() in kernels (it aborts the process), streams
// (every call is synchronous) and timing.
#pragma once

#if defined(_FORTIFY_SOURCE) && _FORTIFY_SOURCE > 0
#error "the CUDA emulator switches stacks with _longjmp: compile it with -U_FORTIFY_SOURCE"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// --- CUDA keywords for a host compiler -------------------------------------------------------
// The CUDA headers define __global__, __device__ and __host__ as nothing for host compilers.
// Blocks run one at a time, so a block's static shared memory can be a plain static.
#undef __shared__
#define __shared__ static
#undef __constant__
#define __constant__
#undef __launch_bounds__
#define __launch_bounds__(...)
// always_inline fails the build where g++ cannot inline; plain inline keeps the linkage.
#undef __forceinline__
#define __forceinline__ inline

namespace dinov2_fast {
namespace emulator {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;
constexpr uint32_t kFullMask = 0xffffffffu;
// Per CUDA thread: room for kernels with large register arrays (reserved, not committed).
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kPageBytes = 4096;
// The H100's limits: dynamic shared memory without and with the per-kernel opt-in, SMs.
constexpr size_t kDefaultDynamicSharedBytes = 48 << 10;
constexpr size_t kMaxDynamicSharedBytes = 232448;
constexpr int kMultiProcessorCount = 132;
// Bytes around the dynamic shared memory in which an ldmatrix/cp.async address is reported as
// out of bounds (further away it may be a static __shared__ variable).
constexpr size_t kSharedGuardBytes = 64 << 10;
constexpr unsigned char kPoisonByte = 0xff;

enum class Collective : uint8_t {
  kNone,
  kSyncWarp,
  kShuffleIdx,
  kShuffleUp,
  kShuffleDown,
  kShuffleXor,
  kVote,
  kLdmatrixX4,
  kLdmatrixX4Trans,
  kLdmatrixX2,
  kLdmatrixX2Trans,
  kMmaHalf,
  kMmaBFloat16,
};

inline const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kNone:
      return "nothing";
    case Collective::kSyncWarp:
      return "__syncwarp";
    case Collective::kShuffleIdx:
      return "__shfl_sync";
    case Collective::kShuffleUp:
      return "__shfl_up_sync";
    case Collective::kShuffleDown:
      return "__shfl_down_sync";
    case Collective::kShuffleXor:
      return "__shfl_xor_sync";
    case Collective::kVote:
      return "__ballot_sync/__any_sync/__all_sync";
    case Collective::kLdmatrixX4:
      return "ldmatrix_x4";
    case Collective::kLdmatrixX4Trans:
      return "ldmatrix_x4_trans";
    case Collective::kLdmatrixX2:
      return "ldmatrix_x2";
    case Collective::kLdmatrixX2Trans:
      return "ldmatrix_x2_trans";
    case Collective::kMmaHalf:
      return "mma_m16n8k16<__half>";
    case Collective::kMmaBFloat16:
      return "mma_m16n8k16<__nv_bfloat16>";
  }
  return "unknown";
}

// What a lane posts to a warp collective, and what it gets back.
struct LaneInput {
  uint64_t value;       // shuffles: the bits of var; votes: the predicate
  int lane_arg;         // shuffles: source lane, delta or lane mask
  int width;            // shuffles
  const void* address;  // ldmatrix: the row this lane points at
  uint32_t a[4];        // mma
  uint32_t b[2];
  float c[4];
};

struct LaneOutput {
  uint64_t value;
  uint32_t regs[4];  // ldmatrix
  float d[4];        // mma
};

struct WarpState {
  uint32_t present;     // lanes that exist (a block's last warp may be partial)
  uint32_t exited;      // lanes whose thread returned
  uint32_t arrived;     // lanes waiting at the pending collective
  uint32_t members;     // lanes the pending collective waits for
  Collective kind;      // the pending collective
  uint64_t generation;  // completed collectives: waiting lanes watch it change
  LaneInput in[kWarpSize];
  LaneOutput out[kWarpSize];
};

struct BarrierState {
  int arrived;
  int exited;  // threads of the block that returned
  int count;   // __syncthreads_count: true predicates of the threads arrived so far
  int result;  // and of the last completed barrier
  uint64_t generation;
};

struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
  uint32_t group;  // commits before it was issued
};

struct Fiber {
  jmp_buf context;
  bool parked = false;  // at the top of its loop, ready for a CUDA thread; else (re)started
  bool done = false;
  uint3 thread_idx = {};
  int warp = 0;
  int lane = 0;
  // Runnable again when *wait_on != wait_value (a barrier's or warp's generation).
  const uint64_t* wait_on = nullptr;
  uint64_t wait_value = 0;
  std::vector<AsyncCopy> copies;  // cp.async copies not landed yet
  uint32_t commits = 0;
};

struct State {
  std::mutex mutex;  // one launch at a time (launchers run without the GIL)
  char* stacks = nullptr;
  Fiber fibers[kMaxBlockThreads];
  Fiber* current = nullptr;
  jmp_buf scheduler;
  // The running launch.
  void (*invoke)(const void*) = nullptr;
  const void* call = nullptr;
  dim3 grid_dim;
  dim3 block_dim;
  uint3 block_idx;
  int block_threads = 0;
  std::vector<char> shared_storage;
  char* shared = nullptr;  // dynamic shared memory, 128-byte aligned
  size_t shared_bytes = 0;
  BarrierState barrier;
  WarpState warps[kMaxWarps];
  // cp.async copies land when issued (the earliest the hardware may) instead of at their wait.
  bool eager_copies = false;
  bool failed = false;
  std::string failure;
  // The runtime API.
  cudaError_t last_error = cudaSuccess;
  cudaError_t failure_code = cudaSuccess;  // the last launch's, until its message is read
  std::string failure_message;
  std::string reported;  // the message cudaGetErrorString returned last
  std::map<const void*, size_t> max_dynamic_shared;  // per kernel, from the opt-in
};

inline State& state() {
  static State s;
  return s;
}

inline Fiber& current() { return *state().current; }

inline std::string format(const char* fmt, va_list args) {
  char buffer[1024];
  vsnprintf(buffer, sizeof(buffer), fmt, args);
  return buffer;
}

inline std::string where(const State& s, const Fiber* f) {
  char buffer[160];
  int n = snprintf(buffer, sizeof(buffer), "block (%u, %u, %u)", s.block_idx.x, s.block_idx.y,
                   s.block_idx.z);
  if (f != nullptr) {
    snprintf(buffer + n, sizeof(buffer) - n, ", thread (%u, %u, %u)", f->thread_idx.x,
             f->thread_idx.y, f->thread_idx.z);
  }
  return buffer;
}

// Ends the launch from inside a CUDA thread: records the error and returns to the scheduler
// for good (the fiber is restarted before its next use).
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  State& s = state();
  va_list args;
  va_start(args, fmt);
  s.failure = where(s, s.current) + ": " + format(fmt, args);
  va_end(args);
  s.failed = true;
  _longjmp(s.scheduler, 1);
}

// --- fibers ----------------------------------------------------------------------------------

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield(Fiber& f) {
  if (_setjmp(f.context) == 0) _longjmp(state().scheduler, 1);
}

// Blocks the current CUDA thread until *generation changes.
inline void wait_for_change(const uint64_t* generation) {
  Fiber& f = current();
  f.wait_on = generation;
  f.wait_value = *generation;
  yield(f);
}

inline void land_copies(Fiber& f, uint32_t groups_done) {
  size_t kept = 0;
  for (const AsyncCopy& copy : f.copies) {
    if (copy.group < groups_done) {
      memcpy(copy.dst, copy.src, static_cast<size_t>(copy.src_bytes));
      memset(static_cast<char*>(copy.dst) + copy.src_bytes, 0, 16 - copy.src_bytes);
    } else {
      f.copies[kept++] = copy;
    }
  }
  f.copies.resize(kept);
}

inline void finish_thread(Fiber& f) {
  State& s = state();
  land_copies(f, UINT32_MAX);  // the hardware completes them whatever the kernel waited for
  WarpState& warp = s.warps[f.warp];
  const uint32_t bit = 1u << f.lane;
  warp.exited |= bit;
  if (warp.arrived != 0 && (warp.members & bit) != 0) {
    fail("returned while lanes 0x%08x of its warp wait for it at %s", warp.arrived,
         collective_name(warp.kind));
  }
  ++s.barrier.exited;
  if (s.barrier.arrived > 0) {
    fail("returned while %d threads of the block wait at __syncthreads", s.barrier.arrived);
  }
  f.done = true;
}

// A fiber's life: park, run the CUDA thread it is given, repeat.
inline void fiber_main() {
  State& s = state();
  Fiber* const self = s.current;
  for (;;) {
    self->parked = true;
    yield(*self);
    self->parked = false;
    s.invoke(s.call);
    finish_thread(*self);
  }
}

inline void allocate_stacks(State& s) {
  if (s.stacks != nullptr) return;
  void* memory = mmap(nullptr, kStackBytes * kMaxBlockThreads, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    fprintf(stderr, "CUDA emulator: cannot reserve the fibers' stacks\n");
    abort();
  }
  s.stacks = static_cast<char*>(memory);
  // A guard page under each stack turns an overflow into a crash instead of corruption.
  for (int i = 0; i < kMaxBlockThreads; ++i) {
    mprotect(s.stacks + i * kStackBytes, kPageBytes, PROT_NONE);
  }
}

inline bool on_a_stack(const State& s, const void* p) {
  const char* c = static_cast<const char*>(p);
  return s.stacks != nullptr && c >= s.stacks && c < s.stacks + kStackBytes * kMaxBlockThreads;
}

// Runs fiber i from a fresh stack up to its first park.
inline void start_fiber(State& s, int i) {
  ucontext_t context;
  getcontext(&context);
  context.uc_stack.ss_sp = s.stacks + i * kStackBytes + kPageBytes;
  context.uc_stack.ss_size = kStackBytes - kPageBytes;
  context.uc_link = nullptr;
  makecontext(&context, fiber_main, 0);
  s.current = &s.fibers[i];
  if (_setjmp(s.scheduler) == 0) setcontext(&context);
}

__attribute__((noinline)) inline void resume(State& s, Fiber& f) {
  s.current = &f;
  if (_setjmp(s.scheduler) == 0) _longjmp(f.context, 1);
}

inline std::string describe_deadlock(const State& s) {
  std::string text = "deadlock";
  const char* separator = ": ";
  if (s.barrier.arrived > 0) {
    text += separator + std::to_string(s.barrier.arrived) + " of " +
            std::to_string(s.block_threads) + " threads wait at __syncthreads";
    separator = "; ";
  }
  for (int w = 0; w * kWarpSize < s.block_threads; ++w) {
    const WarpState& warp = s.warps[w];
    if (warp.arrived == 0) continue;
    char buffer[160];
    snprintf(buffer, sizeof(buffer), "%swarp %d: lanes 0x%08x wait at %s for lanes 0x%08x",
             separator, w, warp.arrived, collective_name(warp.kind), warp.members & ~warp.arrived);
    text += buffer;
    separator = "; ";
  }
  return text;
}

// Resumes fiber i unless it is done or waits for a generation that has not changed; returns
// whether it ran.
inline bool step(State& s, int i, int& running) {
  Fiber& f = s.fibers[i];
  if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_value)) return false;
  f.wait_on = nullptr;
  resume(s, f);
  if (f.done) --running;
  return true;
}

// Runs the block s.block_idx to its end; false when it failed (s.failure says why). Warps run
// one at a time, each until all its threads wait at __syncthreads or have returned: warp 0 first
// in even blocks, the last warp first (and lanes from the last) in odd ones. So a thread that
// reads another warp's (or lane's) shared memory without the barrier in between reads it
// unwritten, poisoned or stale, in one of the two orders. cp.async copies land at their wait in
// blocks 0 and 1 of every 4 and when issued in blocks 2 and 3, so both of their hazards show.
inline bool run_block(State& s) {
  const int n = s.block_threads;
  const int warps = (n + kWarpSize - 1) / kWarpSize;
  const uint3 b = s.block_idx;
  const uint32_t linear = b.x + s.grid_dim.x * (b.y + s.grid_dim.y * b.z);
  const bool reverse = linear % 2 == 1;
  // Blocks 2 and 3 of every 4 land cp.async copies at once, the others at their wait: a read
  // before the wait sees stale data in the latter, and a copy into a buffer that another warp
  // still reads (a missing barrier before reuse) corrupts it in the former.
  s.eager_copies = linear / 2 % 2 == 1;
  s.barrier = BarrierState{};
  for (int w = 0; w < warps; ++w) {
    const int lanes = n - w * kWarpSize < kWarpSize ? n - w * kWarpSize : kWarpSize;
    s.warps[w] = WarpState{};
    s.warps[w].present = lanes == kWarpSize ? kFullMask : (1u << lanes) - 1;
  }
  memset(s.shared, kPoisonByte, s.shared_bytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (!f.parked) start_fiber(s, i);
    f.done = false;
    f.thread_idx = make_uint3(i % s.block_dim.x, i / s.block_dim.x % s.block_dim.y,
                              i / (s.block_dim.x * s.block_dim.y));
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
    f.wait_on = nullptr;
    f.copies.clear();
    f.commits = 0;
  }
  int running = n;
  while (running > 0) {
    bool progressed = false;
    for (int k = 0; k < warps; ++k) {
      const int w = reverse ? warps - 1 - k : k;
      const int lanes = n - w * kWarpSize < kWarpSize ? n - w * kWarpSize : kWarpSize;
      for (bool warp_progressed = true; warp_progressed;) {
        warp_progressed = false;
        for (int j = 0; j < lanes; ++j) {
          const int i = w * kWarpSize + (reverse ? lanes - 1 - j : j);
          if (!step(s, i, running)) continue;
          if (s.failed) return false;
          warp_progressed = progressed = true;
        }
      }
    }
    if (!progressed) {
      s.failure = where(s, nullptr) + ": " + describe_deadlock(s);
      s.failed = true;
      return false;
    }
  }
  return true;
}

inline const char* error_name(cudaError_t code) {
  switch (code) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    default:
      return "unknown error";
  }
}

inline cudaError_t report(State& s, cudaError_t code, const std::string& detail) {
  s.failure_code = code;
  s.failure_message = std::string(error_name(code)) + " (CUDA emulator: " + detail + ")";
  fprintf(stderr, "CUDA emulator: %s\n", detail.c_str());
  return code;
}

inline cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                            void (*invoke)(const void*), const void* call) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.failure_code = cudaSuccess;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > INT32_MAX || grid.y > 65535 ||
      grid.z > 65535 || threads == 0 || threads > kMaxBlockThreads || block.x > 1024 ||
      block.y > 1024 || block.z > 64) {
    char detail[160];
    snprintf(detail, sizeof(detail),
             "bad launch configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y,
             grid.z, block.x, block.y, block.z);
    return report(s, cudaErrorInvalidConfiguration, detail);
  }
  const auto opt_in = s.max_dynamic_shared.find(kernel);
  const size_t limit =
      opt_in == s.max_dynamic_shared.end() ? kDefaultDynamicSharedBytes : opt_in->second;
  if (shared_bytes > limit) {
    return report(s, cudaErrorInvalidValue,
                  std::to_string(shared_bytes) + " bytes of dynamic shared memory, over the " +
                      std::to_string(limit) + " this kernel may use" +
                      (opt_in == s.max_dynamic_shared.end()
                           ? " without set_max_dynamic_shared_memory"
                           : ""));
  }
  allocate_stacks(s);
  const size_t storage = shared_bytes + 2 * kSharedGuardBytes + 128;
  if (s.shared_storage.size() < storage) s.shared_storage.assign(storage, kPoisonByte);
  const uintptr_t start = reinterpret_cast<uintptr_t>(s.shared_storage.data()) + kSharedGuardBytes;
  s.shared = reinterpret_cast<char*>((start + 127) / 128 * 128);
  s.shared_bytes = shared_bytes;
  s.invoke = invoke;
  s.call = call;
  s.grid_dim = grid;
  s.block_dim = block;
  s.block_threads = static_cast<int>(threads);
  s.failed = false;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block_idx = make_uint3(x, y, z);
        if (!run_block(s)) return report(s, cudaErrorLaunchFailure, s.failure);
      }
    }
  }
  return cudaSuccess;
}

// --- warp collectives ------------------------------------------------------------------------

// The calling lane posts its inputs and waits until every lane of `mask` (that exists) has
// posted; the last to arrive runs compute(warp), which fills every lane's output. An aligned
// collective (ldmatrix, mma) needs the whole warp. Returns this lane's output, valid until the
// warp's next collective completes (which needs this lane again).
template <typename Post, typename Compute>
const LaneOutput& warp_collective(Collective kind, uint32_t mask, bool aligned, Post&& post,
                                  Compute&& compute) {
  State& s = state();
  Fiber& f = current();
  WarpState& warp = s.warps[f.warp];
  const uint32_t bit = 1u << f.lane;
  if (aligned && warp.present != kFullMask) {
    fail("%s needs a whole warp; warp %d of this block has lanes 0x%08x only",
         collective_name(kind), f.warp, warp.present);
  }
  if ((mask & bit) == 0) {
    fail("%s called by lane %d, which is not in its mask 0x%08x", collective_name(kind),
         f.lane, mask);
  }
  const uint32_t members = mask & warp.present;
  if ((members & warp.exited) != 0) {
    fail("%s waits for lanes 0x%08x, which already returned", collective_name(kind),
         members & warp.exited);
  }
  if (warp.arrived == 0) {
    warp.kind = kind;
    warp.members = members;
  } else if (warp.kind != kind || warp.members != members) {
    fail("divergent warp: lane %d calls %s (lanes 0x%08x) while lanes 0x%08x wait at %s "
         "(lanes 0x%08x)",
         f.lane, collective_name(kind), members, warp.arrived, collective_name(warp.kind),
         warp.members);
  }
  post(warp.in[f.lane]);
  warp.arrived |= bit;
  if (warp.arrived == warp.members) {
    compute(warp);
    warp.arrived = 0;
    ++warp.generation;
  } else {
    wait_for_change(&warp.generation);
  }
  return warp.out[f.lane];
}

enum class ShuffleMode { kIdx, kUp, kDown, kXor };

// PTX shfl.sync: lane i reads lane j of its segment of `width` lanes, or keeps its own value
// when j falls outside (idx/down/xor: past the segment's end; up: before its start).
inline void compute_shuffle(WarpState& warp, ShuffleMode mode) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if ((warp.members >> lane & 1u) == 0) continue;
    const LaneInput& in = warp.in[lane];
    const int segment_mask = kWarpSize - in.width;  // the lane bits that pick the segment
    const int first = lane & segment_mask;
    const int last = first | (kWarpSize - 1 - segment_mask);
    int source = 0;
    bool inside = false;
    switch (mode) {
      case ShuffleMode::kIdx:
        source = first | (in.lane_arg & (kWarpSize - 1) & ~segment_mask);
        inside = true;
        break;
      case ShuffleMode::kUp:
        source = lane - in.lane_arg;
        inside = source >= first;
        break;
      case ShuffleMode::kDown:
        source = lane + in.lane_arg;
        inside = source <= last;
        break;
      case ShuffleMode::kXor:
        source = lane ^ in.lane_arg;
        inside = source >= 0 && source <= last;
        break;
    }
    if (!inside) source = lane;
    // Reading a lane outside the mask is undefined in CUDA: poison, so that a use shows.
    warp.out[lane].value = (warp.members >> source & 1u) != 0 ? warp.in[source].value : ~0ull;
  }
}

template <typename T>
T shuffle(ShuffleMode mode, Collective kind, unsigned mask, T var, int lane_arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 1 to 8 bytes");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail("%s: width %d is not a power of two in [1, 32]", collective_name(kind), width);
  }
  uint64_t bits = 0;
  memcpy(&bits, &var, sizeof(T));
  const LaneOutput& out = warp_collective(
      kind, mask, false,
      [&](LaneInput& in) {
        in.value = bits;
        in.lane_arg = lane_arg;
        in.width = width;
      },
      [&](WarpState& warp) { compute_shuffle(warp, mode); });
  T result;
  memcpy(&result, &out.value, sizeof(T));
  return result;
}

struct Votes {
  uint32_t ballot;   // the lanes whose predicate is true
  uint32_t members;  // the lanes that voted
};

inline Votes vote(unsigned mask, int predicate) {
  const LaneOutput& out = warp_collective(
      Collective::kVote, mask, false, [&](LaneInput& in) { in.value = predicate != 0; },
      [](WarpState& warp) {
        uint32_t ballot = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) {
          if ((warp.members >> lane & 1u) != 0 && warp.in[lane].value != 0) ballot |= 1u << lane;
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
          warp.out[lane].value = ballot | static_cast<uint64_t>(warp.members) << 32;
        }
      });
  return {static_cast<uint32_t>(out.value), static_cast<uint32_t>(out.value >> 32)};
}

// Ends the launch unless [p, p + bytes) may be shared memory: aligned to `alignment`, not on a
// thread's stack, not next to (but outside) the dynamic shared memory. `what` names the address.
inline void check_shared_access(const std::string& what, const void* p, size_t bytes,
                                size_t alignment) {
  const State& s = state();
  const char* name = what.c_str();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % alignment != 0) fail("%s %p is not %zu-byte aligned", name, p, alignment);
  if (on_a_stack(s, p)) fail("%s %p is a thread's local variable, not shared memory", name, p);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(s.shared);
  const uintptr_t end = begin + s.shared_bytes;
  const bool near = a + kSharedGuardBytes >= begin && a < end + kSharedGuardBytes;
  if (near && (a < begin || a + bytes > end)) {
    fail("%s [%p, %p) is outside the dynamic shared memory [%p, %p)", name, p,
         static_cast<const void*>(static_cast<const char*>(p) + bytes),
         static_cast<const void*>(s.shared), static_cast<const void*>(s.shared + s.shared_bytes));
  }
}

// ldmatrix .m8n8 .b16: matrix i's row r is the 16 bytes at the address of lane 8 * i + r. Lane
// (g = lane / 4, t = lane % 4) gets register i = elements [g][2t] (low half) and [g][2t + 1] of
// matrix i, or with .trans elements [2t][g] and [2t + 1][g].
inline void ldmatrix(Collective kind, int matrices, bool trans, uint32_t* r, const void* row) {
  const LaneOutput& out = warp_collective(
      kind, kFullMask, true, [&](LaneInput& in) { in.address = row; },
      [&](WarpState& warp) {
        for (int lane = 0; lane < 8 * matrices; ++lane) {
          check_shared_access(std::string(collective_name(kind)) + ": lane " +
                                  std::to_string(lane) + "'s row address",
                              warp.in[lane].address, 16, 16);
        }
        auto element = [&](int matrix, int r, int c) {
          uint16_t bits;
          memcpy(&bits, static_cast<const char*>(warp.in[8 * matrix + r].address) + 2 * c, 2);
          return static_cast<uint32_t>(bits);
        };
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int g = lane / 4;
          const int t = lane % 4;
          for (int i = 0; i < matrices; ++i) {
            warp.out[lane].regs[i] =
                trans ? element(i, 2 * t, g) | element(i, 2 * t + 1, g) << 16
                      : element(i, g, 2 * t) | element(i, g, 2 * t + 1) << 16;
          }
        }
      });
  for (int i = 0; i < matrices; ++i) r[i] = out.regs[i];
}

template <typename T>
float bits_to_float(uint32_t bits16) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(bits16);
    return __half2float(__half(raw));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma takes __half or __nv_bfloat16");
    const uint32_t bits = bits16 << 16;  // bf16 is the top half of an fp32
    float value;
    memcpy(&value, &bits, 4);
    return value;
  }
}

// mma.m16n8k16.row.col with fp32 accumulators: D = A B + C. Fragments (g = lane / 4,
// t = lane % 4, two 16-bit elements per register, the lower index in the low half):
//   A 16 x 16: a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..2t+1]  a[2] = A[g][2t+8..2t+9]
//              a[3] = A[g+8][2t+8..2t+9]
//   B 16 x 8:  b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]
//   C, D:      c[0], c[1] = C[g][2t], C[g][2t+1]  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// Products of 16-bit inputs are exact in fp32; they are summed in fp32 in k order.
template <typename T>
void mma(Collective kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
         const float (&c)[4]) {
  const LaneOutput& out = warp_collective(
      kind, kFullMask, true,
      [&](LaneInput& in) {
        memcpy(in.a, a, sizeof(in.a));
        memcpy(in.b, b, sizeof(in.b));
        memcpy(in.c, c, sizeof(in.c));
      },
      [](WarpState& warp) {
        float A[16][16], B[16][8];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int g = lane / 4;
          const int t = lane % 4;
          const LaneInput& in = warp.in[lane];
          for (int half = 0; half < 2; ++half) {
            const int shift = 16 * half;
            A[g][2 * t + half] = bits_to_float<T>(in.a[0] >> shift & 0xffffu);
            A[g + 8][2 * t + half] = bits_to_float<T>(in.a[1] >> shift & 0xffffu);
            A[g][2 * t + 8 + half] = bits_to_float<T>(in.a[2] >> shift & 0xffffu);
            A[g + 8][2 * t + 8 + half] = bits_to_float<T>(in.a[3] >> shift & 0xffffu);
            B[2 * t + half][g] = bits_to_float<T>(in.b[0] >> shift & 0xffffu);
            B[2 * t + 8 + half][g] = bits_to_float<T>(in.b[1] >> shift & 0xffffu);
          }
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int g = lane / 4;
          const int t = lane % 4;
          for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i / 2);
            const int col = 2 * t + i % 2;
            float sum = warp.in[lane].c[i];
            for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
            warp.out[lane].d[i] = sum;
          }
        }
      });
  memcpy(d, out.d, sizeof(out.d));
}

// --- the runtime API the launchers call ----------------------------------------------------

inline cudaError_t get_last_error() {
  State& s = state();
  const cudaError_t error = s.last_error;
  s.last_error = cudaSuccess;
  return error;
}

inline cudaError_t peek_at_last_error() { return state().last_error; }

// The emulator's details for the error of the last launch, once (a later error with the same
// code may come from a launcher's own checks); else the runtime's short message.
inline const char* get_error_string(cudaError_t code) {
  State& s = state();
  if (code != s.failure_code || code == cudaSuccess) return error_name(code);
  s.failure_code = cudaSuccess;
  s.reported = s.failure_message;
  return s.reported.c_str();
}

inline cudaError_t set_error(cudaError_t code) {
  state().last_error = code;
  return code;
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = kMultiProcessorCount;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(kMaxDynamicSharedBytes);
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = kMaxBlockThreads;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = kWarpSize;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    default:
      return set_error(cudaErrorInvalidValue);
  }
}

inline cudaError_t set_max_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes > kMaxDynamicSharedBytes) return set_error(cudaErrorInvalidValue);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t func_set_attribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0) {
    return set_error(cudaErrorInvalidValue);
  }
  return set_max_dynamic_shared(reinterpret_cast<const void*>(kernel),
                                static_cast<size_t>(value));
}

// Streams are ignored: every call completes before it returns.
inline cudaError_t memset_async(void* ptr, int value, size_t count, cudaStream_t = nullptr) {
  memset(ptr, value, count);
  return cudaSuccess;
}

inline cudaError_t memcpy_async(void* dst, const void* src, size_t count, cudaMemcpyKind,
                                cudaStream_t = nullptr) {
  memcpy(dst, src, count);
  return cudaSuccess;
}

// A kernel and its arguments, converted to the kernel's parameter types as <<<...>>> does.
template <typename... Params>
struct KernelCall {
  void (*kernel)(Params...);
  std::tuple<Params...> args;

  static void invoke(const void* self) {
    const auto* call = static_cast<const KernelCall*>(self);
    std::apply(call->kernel, call->args);
  }
};

}  // namespace emulator

// --- common.h's launch interface -----------------------------------------------------------

// Runs kernel on the CPU, block after block; returns cudaErrorInvalidConfiguration or
// cudaErrorInvalidValue for a launch the GPU would refuse and cudaErrorLaunchFailure when a
// thread fails (see the top of this file).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of arguments");
  const emulator::KernelCall<Params...> call{
      kernel, std::tuple<Params...>(static_cast<Params>(std::forward<Args>(args))...)};
  return emulator::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
                            &emulator::KernelCall<Params...>::invoke, &call);
}

template <typename... Params>
cudaError_t set_max_dynamic_shared_memory(void (*kernel)(Params...), size_t bytes) {
  return emulator::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
}

// --- csrc/mma.h's primitives (same signatures) ---------------------------------------------

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  emulator::ldmatrix(emulator::Collective::kLdmatrixX4, 4, false, r, smem_row);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  emulator::ldmatrix(emulator::Collective::kLdmatrixX4Trans, 4, true, r, smem_row);
}

inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  emulator::ldmatrix(emulator::Collective::kLdmatrixX2, 2, false, r, smem_row);
}

inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  emulator::ldmatrix(emulator::Collective::kLdmatrixX2Trans, 2, true, r, smem_row);
}

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
  constexpr auto kind = std::is_same_v<T, __half> ? emulator::Collective::kMmaHalf
                                                  : emulator::Collective::kMmaBFloat16;
  emulator::mma<T>(kind, d, a, b, c);
}

// The copy lands at the cp_async_wait that covers its group (at the latest when the thread
// returns), so a read before the wait sees the poisoned or old shared memory; in the blocks that
// run with eager_copies it lands at once, so overwriting a buffer still being read shows.
inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  emulator::check_shared_access("cp_async_16: shared address", smem_dst, 16, 16);
  if (src_bytes < 0 || src_bytes > 16) {
    emulator::fail("cp_async_16: src_bytes %d is not in [0, 16]", src_bytes);
  }
  if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
    emulator::fail("cp_async_16: global address %p is not 16-byte aligned", gmem_src);
  }
  emulator::Fiber& f = emulator::current();
  f.copies.push_back({smem_dst, gmem_src, src_bytes, f.commits});
  if (emulator::state().eager_copies) emulator::land_copies(f, UINT32_MAX);
}

inline void cp_async_commit() { ++emulator::current().commits; }

template <int kPending>
void cp_async_wait() {
  static_assert(kPending >= 0, "cp_async_wait: a count of pending groups");
  emulator::Fiber& f = emulator::current();
  if (f.commits > static_cast<uint32_t>(kPending)) emulator::land_copies(f, f.commits - kPending);
}

}  // namespace dinov2_fast

// Declares `char* name`, the block's dynamic shared memory (128-byte aligned).
#define DINOV2_FAST_DYNAMIC_SHARED(name) char* name = ::dinov2_fast::emulator::state().shared

// --- built-in variables ----------------------------------------------------------------------
// The CUDA headers declare them as extern constants; these names shadow them with the running
// CUDA thread's values.
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef warpSize
#define threadIdx (static_cast<const uint3&>(::dinov2_fast::emulator::current().thread_idx))
#define blockIdx (static_cast<const uint3&>(::dinov2_fast::emulator::state().block_idx))
#define blockDim (static_cast<const dim3&>(::dinov2_fast::emulator::state().block_dim))
#define gridDim (static_cast<const dim3&>(::dinov2_fast::emulator::state().grid_dim))
#define warpSize 32

// --- synchronisation -------------------------------------------------------------------------

// Counts `predicate` over the block's threads while waiting for all of them.
inline int __syncthreads_count(int predicate) {
  using namespace dinov2_fast::emulator;
  State& s = state();
  if (s.barrier.exited > 0) {
    fail("__syncthreads reached after %d threads of the block returned", s.barrier.exited);
  }
  s.barrier.count += predicate != 0;
  if (++s.barrier.arrived == s.block_threads) {
    s.barrier.result = s.barrier.count;
    s.barrier.count = 0;
    s.barrier.arrived = 0;
    ++s.barrier.generation;
  } else {
    wait_for_change(&s.barrier.generation);
  }
  return s.barrier.result;  // unchanged until this thread arrives at the next barrier
}

inline void __syncthreads() { (void)__syncthreads_count(0); }
inline int __syncthreads_and(int predicate) {
  return __syncthreads_count(predicate) == dinov2_fast::emulator::state().block_threads;
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) != 0; }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace dinov2_fast::emulator;
  warp_collective(Collective::kSyncWarp, mask, false, [](LaneInput&) {}, [](WarpState&) {});
}

// Every thread sees the others' writes at barriers anyway: blocks run one thread at a time.
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace dinov2_fast::emulator;
  return shuffle(ShuffleMode::kIdx, Collective::kShuffleIdx, mask, var, src_lane, width);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace dinov2_fast::emulator;
  return shuffle(ShuffleMode::kUp, Collective::kShuffleUp, mask, var, static_cast<int>(delta),
                 width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace dinov2_fast::emulator;
  return shuffle(ShuffleMode::kDown, Collective::kShuffleDown, mask, var,
                 static_cast<int>(delta), width);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace dinov2_fast::emulator;
  return shuffle(ShuffleMode::kXor, Collective::kShuffleXor, mask, var, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return dinov2_fast::emulator::vote(mask, predicate).ballot;
}
inline int __any_sync(unsigned mask, int predicate) {
  return dinov2_fast::emulator::vote(mask, predicate).ballot != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  const auto votes = dinov2_fast::emulator::vote(mask, predicate);
  return votes.ballot == votes.members;
}

// --- atomics: a thread runs alone until it reaches a barrier or a collective ------------------

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}

template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}

template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}

template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// --- loads, math and bit intrinsics ----------------------------------------------------------

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
template <typename T>
void __stcg(T* p, T value) {
  *p = value;
}
template <typename T>
void __stcs(T* p, T value) {
  *p = value;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float x) {
  int i;
  memcpy(&i, &x, 4);
  return i;
}
inline float __uint_as_float(unsigned x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  memcpy(&u, &x, 4);
  return u;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// --- the CUDA runtime, without libcudart ---------------------------------------------------
// Renamed so that the emulated module never binds to a libcudart that torch loaded.
#define cudaGetLastError ::dinov2_fast::emulator::get_last_error
#define cudaPeekAtLastError ::dinov2_fast::emulator::peek_at_last_error
#define cudaGetErrorString ::dinov2_fast::emulator::get_error_string
#define cudaGetDevice ::dinov2_fast::emulator::get_device
#define cudaDeviceGetAttribute ::dinov2_fast::emulator::device_get_attribute
#define cudaFuncSetAttribute ::dinov2_fast::emulator::func_set_attribute
#define cudaMemsetAsync ::dinov2_fast::emulator::memset_async
#define cudaMemcpyAsync ::dinov2_fast::emulator::memcpy_async
