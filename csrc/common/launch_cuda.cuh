// The GPU side of the shared launcher: a grid-stride loop over a HOST_DEVICE functor.
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "common/host_device.h"

namespace maskops {

template <typename F>
__global__ void for_each_kernel(int64_t n, F f) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    f(i);
  }
}

// Starts f(i) for i in [0, n) on the current stream; never synchronises with the host.
template <typename F>
void cuda_for_each(int64_t n, const F& f, int threads = 256) {
  if (n <= 0) return;
  // Enough blocks to fill any current GPU many times over; the loop covers the rest.
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  for_each_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace maskops
