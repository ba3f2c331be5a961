// Runs the kernels of steer_kernels.cu on the CPU, for tests on machines without a GPU: one std::thread per CUDA
// thread, blocks running kEmulatedConcurrentBlocks at a time (like several SMs), each with a std::barrier
// (__syncthreads), one per warp (__shfl_xor_sync) and a heap buffer as its shared memory (filled with NaN, so a
// read of an entry nobody wrote shows up), and a check that every vector access is aligned to its size, as the GPU
// requires. Built with -fsanitize=thread, ThreadSanitizer sees every race between threads of a block (a missing
// __syncthreads) or between concurrent blocks. tests/test_cuda.py rewrites the few CUDA-only constructs of the
// sources (kernel launches, `extern __shared__`, inline PTX, the stream) to use this header.
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
inline thread_local float* emulated_warp_lanes = nullptr;  // two buffers of 32, used in turns
inline thread_local unsigned emulated_shuffles = 0;
inline constexpr int kEmulatedSmCount = 1;  // one SM: the persistent backward loops over several tiles per block
inline constexpr unsigned kEmulatedConcurrentBlocks = 4;

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned lane = threadIdx.x % 32;
  // Alternate buffers: a lane writes one only after the barrier of the next shuffle, which all lanes reach
  // after reading it, so one barrier per shuffle suffices.
  float* lanes = emulated_warp_lanes + 32 * (emulated_shuffles++ % 2);
  lanes[lane] = value;
  emulated_warp_barrier->arrive_and_wait();
  return lanes[lane ^ offset];
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

// The state one block's threads share.
struct EmulatedBlock {
  std::vector<float4> shared;
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> lanes;

  EmulatedBlock(unsigned threads, size_t shared_bytes)
      : shared(shared_bytes / sizeof(float4) + 1, make_float4(NAN, NAN, NAN, NAN)),
        block_barrier(threads),
        lanes(64 * ((threads + 31) / 32)) {
    for (unsigned w = 0; 32 * w < threads; ++w) {
      warp_barriers.emplace_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
    }
  }
};

// kernel<<<grid, block, shared_bytes, stream>>>(args...): blocks in waves of kEmulatedConcurrentBlocks.
template <typename Kernel, typename... Args>
void emulated_launch(Kernel kernel, unsigned grid, unsigned block, size_t shared_bytes, cudaStream_t, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned first = 0; first < grid; first += kEmulatedConcurrentBlocks) {
    const unsigned blocks = std::min(grid - first, kEmulatedConcurrentBlocks);
    std::vector<std::unique_ptr<EmulatedBlock>> state;
    for (unsigned b = 0; b < blocks; ++b) state.emplace_back(new EmulatedBlock(block, shared_bytes));
    std::vector<std::thread> threads;
    for (unsigned b = 0; b < blocks; ++b) {
      for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, b, t] {
          EmulatedBlock& mine = *state[b];
          threadIdx = {t, 0, 0};
          blockIdx = {first + b, 0, 0};
          emulated_shared_memory = reinterpret_cast<unsigned char*>(mine.shared.data());
          emulated_block_barrier = &mine.block_barrier;
          emulated_warp_barrier = mine.warp_barriers[t / 32].get();
          emulated_warp_lanes = mine.lanes.data() + 64 * (t / 32);
          kernel(args...);
        });
      }
    }
    for (std::thread& thread : threads) thread.join();
  }
}
