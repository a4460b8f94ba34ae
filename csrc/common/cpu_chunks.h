// A CPU launcher for kernels that call a torch op between two passes over their elements
// (box coding calls torch's own vectorised exp / log there, see boxes/box_coder.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace maskops {

// Elements per chunk below the parallel size: with two exp / log arguments per element, a
// chunk's torch op stays within torch's own grain (2048 values) and so runs on the calling
// thread too. (at::in_parallel_region() is omp_in_parallel(): torch ops called from the serial
// path of at::parallel_for would start parallel regions of their own.)
constexpr int64_t kSmallChunk = 1024;

// Runs f(lo, hi) over [0, n) chunk by chunk. Below `parallel_min` elements everything runs on
// the calling thread in chunks of kSmallChunk, with no parallel region at all: on a busy
// machine a region can wait a whole time slice for its threads, far longer than a small
// kernel. From `parallel_min` on, chunks of `chunk` elements are shared among the intra-op
// threads in one parallel region, inside which the torch ops f calls run inline.
template <typename F>
void cpu_for_each_chunk(int64_t n, int64_t chunk, int64_t parallel_min, const F& f) {
  if (n <= 0) return;
  if (n < parallel_min || at::get_num_threads() == 1) {
    const int64_t step = n < parallel_min ? kSmallChunk : chunk;
    for (int64_t lo = 0; lo < n; lo += step) f(lo, std::min(n, lo + step));
    return;
  }
  const int64_t chunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Runs f(lo, hi) over [0, n) in chunks of `chunk` handed out one at a time to the intra-op
// threads. at::parallel_for gives each thread a fixed share up front, so when another process
// takes half of one core the whole op waits for that thread's share (twice its time); here the
// other threads take over its chunks. For loops whose chunks write disjoint outputs, so that
// the results do not depend on which thread ran what.
template <typename F>
void parallel_for_dynamic(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

}  // namespace maskops
