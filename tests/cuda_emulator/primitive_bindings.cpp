// _primitives_emulated: the launchers of primitive_kernels.h for Python, built only for the CPU
// emulator. Addresses are ints (tensor.data_ptr()); a failed launch raises RuntimeError with
// the emulator's message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "primitive_kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t status) {
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
}

}  // namespace

PYBIND11_MODULE(_primitives_emulated, m) {
  namespace t = dinov2_fast::test;
  m.def("ldmatrix", [](uintptr_t tile, int tile_elems, uintptr_t offsets, int variant,
                       uintptr_t out) {
    check(t::run_ldmatrix(as_pointer<const uint16_t>(tile), tile_elems,
                          as_pointer<const int32_t>(offsets), variant, as_pointer<uint32_t>(out),
                          nullptr));
  });
  m.def("mma", [](uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype) {
    check(t::run_mma(as_pointer<const uint32_t>(a), as_pointer<const uint32_t>(b),
                     as_pointer<const float>(c), as_pointer<float>(d), dtype, nullptr));
  });
  m.def("shuffle", [](uintptr_t in, uintptr_t args, uintptr_t out, int threads, int mode,
                      int width, uint32_t mask, bool as_float) {
    check(t::run_shuffle(as_pointer<const uint32_t>(in), as_pointer<const int32_t>(args),
                         as_pointer<uint32_t>(out), threads, mode, width, mask, as_float,
                         nullptr));
  });
  m.def("vote", [](uintptr_t predicate, uintptr_t out, int threads, uint32_t mask) {
    check(t::run_vote(as_pointer<const int32_t>(predicate), as_pointer<uint32_t>(out), threads,
                      mask, nullptr));
  });
  m.def("indices", [](py::tuple grid, py::tuple block, uintptr_t out) {
    const dim3 g(grid[0].cast<unsigned>(), grid[1].cast<unsigned>(), grid[2].cast<unsigned>());
    const dim3 b(block[0].cast<unsigned>(), block[1].cast<unsigned>(), block[2].cast<unsigned>());
    check(t::run_indices(g, b, as_pointer<int32_t>(out), nullptr));
  });
  m.def("cp_async", [](uintptr_t src, uintptr_t src_bytes, uintptr_t out) {
    check(t::run_cp_async(as_pointer<const uint8_t>(src), as_pointer<const int32_t>(src_bytes),
                          as_pointer<uint8_t>(out), nullptr));
  });
  m.def("fresh_shared", [](int blocks, uintptr_t out) {
    check(t::run_fresh_shared(blocks, as_pointer<uint32_t>(out), nullptr));
  });
  m.def("local_array", [](int threads, uintptr_t out) {
    check(t::run_local_array(threads, as_pointer<float>(out), nullptr));
  });
  m.def("misuse", [](int kind) { check(t::run_misuse(kind, nullptr)); });
  m.def("config", [](int threads, size_t smem_bytes, size_t opt_in_bytes) {
    check(t::run_config(threads, smem_bytes, opt_in_bytes, nullptr));
  });
}
