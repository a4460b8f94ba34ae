// A CPU launcher for kernels that need a torch op between two passes over their elements
// (box coding calls torch's own vectorised exp / log there, see boxes/box_coder.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

namespace maskops {

// Runs f(lo, hi) over [0, n) in chunks of `chunk` elements, the chunks shared among the
// intra-op threads in a single parallel region (`min_chunks` per task, so small inputs stay
// on the calling thread). Torch ops that f calls run inline on its thread: at::parallel_for
// marks its body as a parallel region, also when it runs it serially.
template <typename F>
void cpu_for_each_chunk(int64_t n, int64_t chunk, int64_t min_chunks, const F& f) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, chunks, min_chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

}  // namespace maskops
