// Just enough of CUDA to run the kernels' device code on a CPU, so that the tests check the very code
// that runs on the GPU (kernels/csrc/*_kernel.cuh) on a machine without one. A block runs as blockDim.x
// std::threads: __syncthreads is a barrier of the block, a warp shuffle a barrier of the warp's 32
// threads; blocks run one after another, so one static buffer serves as shared memory. Slow, and only
// for tests: it checks the logic (indexing, synchronisation, merging, rounding), not the speed.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_runtime.h>  // uint4, make_uint4, dim3 and the fp16/bf16 types (host code only)

// cuda_runtime.h gave these their meaning for a host compiler (attributes it ignores); here they are nothing.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(threads)
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

namespace emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Index threadIdx;
inline Index blockIdx, blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> warp_slots;  // one float per thread: what it offers to a shuffle

// Run kernel(args...) on grid x block threads (1-D blocks), block after block.
template <typename Kernel>
void launch(dim3 grid, unsigned threads, Kernel kernel) {
  gridDim = Index{grid.x, grid.y, grid.z};
  blockDim = Index{threads, 1, 1};
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  warp_barriers.clear();
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  warp_slots.assign(threads, 0.f);
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = Index{x, y, 0};
      std::vector<std::thread> block;
      for (unsigned t = 0; t < threads; ++t) {
        block.emplace_back([t, &kernel] {
          threadIdx = Index{t, 0, 0};
          kernel();
        });
      }
      for (auto& thread : block) thread.join();
    }
  }
}

}  // namespace emulation

using emulation::blockDim;
using emulation::blockIdx;
using emulation::gridDim;
using emulation::threadIdx;

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: the whole warp*/, float value, int offset) {
  const unsigned t = threadIdx.x;
  auto& warp = *emulation::warp_barriers[t / 32];
  emulation::warp_slots[t] = value;
  warp.arrive_and_wait();
  const float other = emulation::warp_slots[(t / 32) * 32 + ((t % 32) ^ unsigned(offset))];
  warp.arrive_and_wait();
  return other;
}

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

// Host float arithmetic rounds to nearest; the build disables contraction (-ffp-contract=off) as the
// kernels ask with __fmul_rn/__fadd_rn.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
