// The HOST_DEVICE macro and the CPU side of the shared launcher.
//
// A kernel's per-thread body is a small functor with
//   HOST_DEVICE void operator()(int64_t i) const;
// started by cpu_for_each (at::parallel_for) here or cuda_for_each (a grid-stride loop,
// common/launch_cuda.cuh) on the GPU, so CPU tests run the very body the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#define DEVICE_INLINE __device__ __forceinline__
#else
#define HOST_DEVICE
#endif

namespace maskops {

// Adds v to *p: an atomic add on the GPU; a plain add on the host, where the caller
// guarantees that no two iterations touch the same address (or runs them serially).
template <typename T>
HOST_DEVICE inline void accumulate(T* p, T v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Index of the lowest set bit of x (x != 0).
HOST_DEVICE inline int lowest_bit(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

}  // namespace maskops

#if !defined(__CUDACC__)
#include <ATen/Parallel.h>

namespace maskops {

// Runs f(i) for i in [0, n) on the intra-op thread pool, `grain` iterations per task.
template <typename F>
void cpu_for_each(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Runs f(i) for i in [0, n) in order on the calling thread (for bodies that accumulate).
template <typename F>
void cpu_for_each_serial(int64_t n, const F& f) {
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace maskops
#endif
