// The caching, huge-page CPU allocator of cpu_allocator.h.
#include "common/cpu_allocator.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MASKOPS_HAVE_MMAP 1
#endif

#if defined(__SANITIZE_ADDRESS__)
#define MASKOPS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MASKOPS_SANITIZED 1
#endif
#endif

namespace maskops {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// A block of `size` bytes (a multiple of kHugePage) at a kHugePage-aligned address.
struct Block {
  void* ptr;
  size_t size;
};

void* map_block(size_t size) {
#if defined(MASKOPS_HAVE_MMAP)
  // Map one huge page more than asked and trim both ends to an aligned range: only aligned
  // 2 MiB ranges can be backed by huge pages.
  char* raw = static_cast<char*>(mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (raw == MAP_FAILED) return nullptr;
  char* aligned = reinterpret_cast<char*>(round_up(reinterpret_cast<uintptr_t>(raw), kHugePage));
  if (aligned > raw) munmap(raw, aligned - raw);
  const size_t tail = (raw + size + kHugePage) - (aligned + size);
  if (tail > 0) munmap(aligned + size, tail);
#if defined(MADV_HUGEPAGE)
  madvise(aligned, size, MADV_HUGEPAGE);  // advice only: fine if the system declines
#endif
  return aligned;
#else
  return std::aligned_alloc(kHugePage, size);
#endif
}

void unmap_block(const Block& b) {
#if defined(MASKOPS_HAVE_MMAP)
  munmap(b.ptr, b.size);
#else
  std::free(b.ptr);
#endif
}

int64_t limit_from_env() {
  const char* s = std::getenv("MASKOPS_CPU_CACHE_MB");
  if (s == nullptr || *s == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0,
              "MASKOPS_CPU_CACHE_MB must be a non-negative integer (megabytes), got '", s, "'");
  return static_cast<int64_t>(mb) << 20;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
#if defined(MASKOPS_SANITIZED)
    return c10::GetDefaultCPUAllocator()->allocate(n);
#else
    if (n < static_cast<size_t>(kMinCachedBytes)) return c10::GetDefaultCPUAllocator()->allocate(n);
    Block* b = take(round_up(n, kHugePage));
    return {b->ptr, b, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
#endif
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t freed = 0;
    for (auto& kv : free_) {
      unmap_block(kv.second);
      freed += static_cast<int64_t>(kv.second.size);
    }
    free_.clear();
    kept_ = 0;
    return freed;
  }

  int64_t set_limit(int64_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t previous = limit_;
    limit_ = limit;
    trim(0);
    return previous;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
#if defined(MASKOPS_SANITIZED)
    const int64_t bypassed = 1;
#else
    const int64_t bypassed = 0;
#endif
    return {kept_, limit_, hits_, misses_, bypassed};
  }

 private:
  // A kept block of at least `size` bytes and at most a quarter more, else a new one.
  Block* take(size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        Block* b = new Block(it->second);
        kept_ -= static_cast<int64_t>(b->size);
        free_.erase(it);
        ++hits_;
        return b;
      }
      ++misses_;
    }
    void* p = map_block(size);
    if (p == nullptr) {  // maybe memory is held here: give it back and try once more
      release_all();
      p = map_block(size);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "maskops: could not allocate ", size,
                     " bytes of CPU memory");
    return new Block{p, size};
  }

  // Keeps a block freed by its tensor, making room by dropping the largest kept blocks; a
  // block larger than the limit goes back to the system.
  void give_back(Block* b) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t size = static_cast<int64_t>(b->size);
    trim(size);
    if (kept_ + size <= limit_) {
      free_.emplace(b->size, *b);
      kept_ += size;
    } else {
      unmap_block(*b);
    }
    delete b;
  }

  // Drops the largest kept blocks until `room` more bytes fit the limit (mu_ held).
  void trim(int64_t room) {
    while (!free_.empty() && kept_ + room > limit_) {
      auto largest = std::prev(free_.end());
      unmap_block(largest->second);
      kept_ -= static_cast<int64_t>(largest->first);
      free_.erase(largest);
    }
  }

  static void release(void* ctx);

  std::mutex mu_;
  std::multimap<size_t, Block> free_;  // by size, for best fit
  int64_t kept_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
CachingCpuAllocator& instance() {
  static CachingCpuAllocator* a = new CachingCpuAllocator();
  return *a;
}

void CachingCpuAllocator::release(void* ctx) { instance().give_back(static_cast<Block*>(ctx)); }

}  // namespace

c10::Allocator* cpu_allocator() { return &instance(); }

at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, cpu_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, format);
}

int64_t cpu_cache_release() { return instance().release_all(); }

int64_t cpu_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the CPU cache limit must be non-negative, got ", bytes);
  return instance().set_limit(bytes);
}

std::vector<int64_t> cpu_cache_stats() { return instance().stats(); }

}  // namespace maskops
