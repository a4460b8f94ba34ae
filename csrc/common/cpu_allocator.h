// Where the CPU kernels get their large buffers (outputs and workspaces).
//
// A fresh multi-megabyte buffer from malloc is mapped 4 KiB page by page on first touch: on
// the machines this library is tuned on, filling a new 64 MB mask image costs ~15 ms in page
// faults against ~1 ms for memory already mapped, more than the paste itself. So buffers of
// kMinCachedBytes and more come from a small cache: blocks freed by their tensors are kept
// (up to a byte limit) and handed to the next request of a similar size. New blocks of
// 32 MiB and more are mapped with transparent huge pages where the system allows them
// (Linux, madvise): 512x fewer faults. Smaller buffers go to torch's default CPU allocator.
//
// Tensors made here are ordinary CPU tensors (resizable, shareable, freed by their last
// reference); only their memory comes back to this cache instead of the system. The memory
// itself comes from the C library, as torch's default CPU allocator's does, and may be freed
// by it (see cpu_cache_route_torch).
// MASKOPS_CPU_CACHE_MB sets the limit on kept bytes (default 1024; 0 keeps nothing), the
// oldest kept blocks going first, and maskops.empty_cache() returns what is kept to the
// system. MASKOPS_CPU_HUGE_PAGES=0 maps ordinary pages only. A forked child starts with
// nothing kept. Sanitizer builds bypass the cache so that AddressSanitizer sees every
// buffer's bounds.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

namespace maskops {

constexpr int64_t kMinCachedBytes = int64_t(1) << 20;

// The allocator itself (also usable with at::detail::empty_generic).
c10::Allocator* cpu_allocator();

// at::empty on the CPU from cpu_allocator().
at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype,
                     at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Returns every kept block to the system; the number of bytes released.
int64_t cpu_cache_release();

// Sets the limit on kept bytes (dropping kept blocks over it); returns the previous limit.
int64_t cpu_cache_set_limit(int64_t bytes);

// Routes torch's CPU allocations of this thread through the cache (on = true), so that every
// CPU tensor of kMinCachedBytes and more that the thread allocates (oneDNN convolutions,
// matmuls, copies) takes its memory from the cache; on = false ends one such block, on the
// thread that began it. Blocks nest, on any number of threads. torch's CPU allocator is
// replaced only while a block is open anywhere, and only if it is torch's default allocator:
// once the last block ends, the default allocator is torch's again. Memory taken inside a
// block and freed after it, even through raw_deallocate as oneDNN does, goes back to its owner.
// Returns whether this thread's allocations are routed after the call (false after on =
// false, where another allocator than torch's default is in place, or in a sanitizer build).
bool cpu_cache_route_torch(bool on);

// For tests: [torch's CPU allocator now, torch's default CPU allocator, the routing allocator
// (0 if never made), as addresses; blocks open on this thread; blocks open on all threads].
std::vector<int64_t> cpu_cache_torch_allocator();

// [bytes kept now, limit, requests served from the cache, requests that mapped new memory,
//  1 if the cache is bypassed (sanitizer builds) else 0]
std::vector<int64_t> cpu_cache_stats();

}  // namespace maskops
