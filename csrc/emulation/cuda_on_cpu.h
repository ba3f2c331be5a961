// Runs the kernels of steer_kernels.cu on the CPU, for tests on machines without a GPU: one std::thread per CUDA
// thread, a std::barrier per block (__syncthreads) and per warp (__shfl_xor_sync), a heap buffer as the block's
// shared memory (filled with NaN, so a read of an entry nobody wrote shows up), and a check that every vector
// access is aligned to its size, as the GPU requires. tests/test_cuda.py rewrites the few CUDA-only constructs
// of the sources (kernel launches, `extern __shared__`, inline PTX, the stream) to use this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedIndex threadIdx, blockIdx;
inline EmulatedIndex blockDim, gridDim;
inline thread_local unsigned char* emulated_shared_memory = nullptr;
inline thread_local std::barrier<>* emulated_block_barrier = nullptr;
inline thread_local std::barrier<>* emulated_warp_barrier = nullptr;
inline thread_local float* emulated_warp_lanes = nullptr;
inline constexpr int kEmulatedSmCount = 1;  // one SM: the persistent backward loops over several tiles per block

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned lane = threadIdx.x % 32;
  emulated_warp_lanes[lane] = value;
  emulated_warp_barrier->arrive_and_wait();
  const float other = emulated_warp_lanes[lane ^ offset];
  emulated_warp_barrier->arrive_and_wait();
  return other;
}

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "misaligned %zu-byte access at %p\n", bytes, p);
    std::abort();
  }
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...): `block` threads run the blocks one after another.
template <typename Kernel, typename... Args>
void emulated_launch(Kernel kernel, unsigned grid, unsigned block, size_t shared_bytes, cudaStream_t, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  const unsigned warps = (block + 31) / 32;
  std::vector<float4> shared(shared_bytes / sizeof(float4) + 1);
  std::barrier<> block_barrier(block);
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  for (unsigned w = 0; w < warps; ++w) warp_barriers.emplace_back(new std::barrier<>(std::min(32u, block - 32 * w)));
  std::vector<float> lanes(32 * warps);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      emulated_shared_memory = reinterpret_cast<unsigned char*>(shared.data());
      emulated_block_barrier = &block_barrier;
      emulated_warp_barrier = warp_barriers[t / 32].get();
      emulated_warp_lanes = lanes.data() + 32 * (t / 32);
      for (unsigned b = 0; b < grid; ++b) {
        if (t == 0) std::fill(shared.begin(), shared.end(), make_float4(NAN, NAN, NAN, NAN));
        block_barrier.arrive_and_wait();
        blockIdx = {b, 0, 0};
        kernel(args...);
        block_barrier.arrive_and_wait();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
}
