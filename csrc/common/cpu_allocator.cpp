// The caching, huge-page CPU allocator of cpu_allocator.h.
#include "common/cpu_allocator.h"

#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#if defined(_WIN32)
#include <malloc.h>
#else
#include <pthread.h>
#include <sys/mman.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define MASKOPS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define MASKOPS_SANITIZED 1
#endif
#endif

namespace maskops {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Huge pages only from this size on: measured here, fresh buffers of 41-256 MB filled 2-4x
// faster with them, while with ~10 MB ones the time of a call varied from 1.3x faster to 3x
// slower from run to run.
constexpr size_t kMinHugePageBlock = size_t(32) << 20;
constexpr int64_t kDefaultLimitMB = 1024;
constexpr long long kMaxLimitMB = 1LL << 30;  // 1 PiB: keeps MB << 20 inside int64

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// MASKOPS_CPU_HUGE_PAGES=0 turns the huge-page advice off (read once).
bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* s = std::getenv("MASKOPS_CPU_HUGE_PAGES");
    return s == nullptr || std::string(s) != "0";
  }();
  return wanted;
}

// `size` bytes (a multiple of kHugePage) at a kHugePage-aligned address, or nullptr. The
// memory comes from the C library as torch's default CPU allocator's does (c10::alloc_cpu),
// so that its free (c10::free_cpu) may release it too: a oneDNN buffer taken from the cache
// during a routed block and freed after the block goes through torch's default allocator.
// (Only aligned 2 MiB ranges can be backed by huge pages.)
void* map_block(size_t size) {
#if defined(_WIN32)
  return _aligned_malloc(size, kHugePage);
#else
  void* p = nullptr;
  if (posix_memalign(&p, kHugePage, size) != 0) return nullptr;
#if defined(MADV_HUGEPAGE)
  if (size >= kMinHugePageBlock && huge_pages_wanted())
    madvise(p, size, MADV_HUGEPAGE);  // advice: the system may decline
#endif
  return p;
#endif
}

void unmap_block(void* ptr, size_t /*size*/) { c10::free_cpu(ptr); }

// MASKOPS_CPU_CACHE_MB, or the default (with a warning) when it is not a usable number.
int64_t limit_from_env() {
  const char* s = std::getenv("MASKOPS_CPU_CACHE_MB");
  if (s == nullptr || *s == '\0') return kDefaultLimitMB << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || mb < 0 || errno == ERANGE || mb > kMaxLimitMB) {
    TORCH_WARN("maskops: MASKOPS_CPU_CACHE_MB must be a non-negative integer (megabytes) up to ",
               kMaxLimitMB, ", got '", s, "'; using the default of ", kDefaultLimitMB);
    return kDefaultLimitMB << 20;
  }
  return static_cast<int64_t>(mb) << 20;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
#if defined(MASKOPS_SANITIZED)
    return c10::GetDefaultCPUAllocator()->allocate(n);
#else
    if (n < static_cast<size_t>(kMinCachedBytes)) return others()->allocate(n);
    void* p = take(round_up(n, kHugePage));
    // Context == data (a "simple" data pointer), as copy-on-write storages require.
    return {p, p, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
#endif
  }

  // For raw_allocate / raw_deallocate users (oneDNN's buffers, while routing is installed).
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::release_raw; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release_all() {
    std::vector<Kept> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(kept_);
      kept_bytes_ = 0;
    }
    int64_t freed = 0;
    for (const Kept& k : drop) {
      unmap_block(k.ptr, k.size);
      freed += static_cast<int64_t>(k.size);
    }
    return freed;
  }

  int64_t set_limit(int64_t limit) {
    std::vector<Kept> drop;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mu_);
      previous = limit_;
      limit_ = limit;
      trim(0, drop);
    }
    for (const Kept& k : drop) unmap_block(k.ptr, k.size);
    return previous;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
#if defined(MASKOPS_SANITIZED)
    const int64_t bypassed = 1;
#else
    const int64_t bypassed = 0;
#endif
    return {kept_bytes_, limit_, hits_, misses_, bypassed};
  }

  // Routing was removed: live blocks handed out so far may be freed without this cache
  // hearing of it (see give_back).
  void routing_removed() {
    std::lock_guard<std::mutex> lock(mu_);
    ++epoch_;
  }

  // fork(): the parent holds mu_ across the fork so the child's copy of the state is
  // consistent; the child then drops its copies of the kept blocks (reusing them would
  // only copy-on-write the parent's pages). Blocks in use stay live in both processes.
  void before_fork() { mu_.lock(); }
  void after_fork_in_parent() { mu_.unlock(); }
  void after_fork_in_child() {
    for (const Kept& k : kept_) unmap_block(k.ptr, k.size);
    kept_.clear();
    kept_bytes_ = 0;
    mu_.unlock();
  }

 private:
  struct Kept {
    void* ptr;
    size_t size;
    uint64_t freed_at;  // a counter: lower is older
  };

  // The smallest kept block of at least `size` bytes and at most a quarter more, else a
  // newly mapped one. (Kept blocks are few, so a linear scan is fine.)
  void* take(size_t size) {
    std::vector<Kept> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = kept_.size();
      for (size_t i = 0; i < kept_.size(); ++i)
        if (kept_[i].size >= size && kept_[i].size <= size + size / 4 &&
            (best == kept_.size() || kept_[i].size < kept_[best].size))
          best = i;
      if (best < kept_.size()) {
        const Kept k = kept_[best];
        kept_[best] = kept_.back();
        kept_.pop_back();
        kept_bytes_ -= static_cast<int64_t>(k.size);
        add_live(k.ptr, k.size);  // (may throw before anything changed hands: k is lost to
                                  // the cache but stays allocated, never corrupt)
        ++hits_;
        report(k.ptr, static_cast<int64_t>(k.size));
        return k.ptr;
      }
      ++misses_;
      // New memory is about to be mapped: first give back at least as many idle kept bytes
      // (the oldest), so that what is kept for later calls never adds to the process's peak:
      // the cache grows only while all it keeps is in use.
      while (!kept_.empty() && drop_oldest(drop) < size) {
      }
    }
    for (const Kept& k : drop) unmap_block(k.ptr, k.size);
    void* p = map_block(size);
    if (p == nullptr) {  // maybe memory is kept here: give it back and try once more
      release_all();
      p = map_block(size);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "maskops: could not allocate ", size,
                     " bytes of CPU memory");
    std::lock_guard<std::mutex> lock(mu_);
    try {
      add_live(p, size);
    } catch (...) {
      unmap_block(p, size);
      throw;
    }
    report(p, static_cast<int64_t>(size));
    return p;
  }

  // Keeps a block freed by its tensor (or, raw, through the routing allocator), dropping the
  // oldest kept blocks to make room; a block larger than the limit goes straight back to the
  // system.
  //
  // A block that torch's routing allocator handed out (a oneDNN buffer from raw_allocate) and
  // that is freed after the routing ended goes to torch's default allocator instead, which
  // frees it (map_block's memory is its kind): this cache never hears of it, and its entry in
  // live_ goes stale, possibly naming memory the C library has since given to someone else.
  // A tensor's own deleter is never bypassed, so `raw` = false is always a block of ours. A
  // raw free is trusted only for blocks handed out since routing was last removed (epoch);
  // for older entries, which may be stale, the pointer goes to torch's default allocator,
  // right for our memory and for someone else's alike (the block is then lost to the cache).
  void give_back(void* p, bool raw) {
    // Every block of the cache starts on a huge-page boundary: any other pointer (most of
    // what oneDNN frees through the routing allocator) skips the lock.
    if (reinterpret_cast<uintptr_t>(p) % kHugePage != 0) {
      others()->raw_deallocate(p);
      return;
    }
    std::vector<Kept> drop;
    bool owned = true;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      owned = it != live_.end() && (!raw || it->second.epoch == epoch_);
      if (it != live_.end()) {
        const size_t size = it->second.size;
        live_.erase(it);
        live_bytes_ -= static_cast<int64_t>(size);
        if (!owned) {
          // handed on below
        } else if (static_cast<int64_t>(size) > limit_) {
          drop.push_back({p, size, 0});
        } else {
          trim(static_cast<int64_t>(size), drop);
          kept_.push_back({p, size, ++clock_});
          kept_bytes_ += static_cast<int64_t>(size);
        }
        report(p, -static_cast<int64_t>(size));  // the end of what report() said at take()
      }
    }
    // Not a block of ours (a small one, one from before routing, or maybe stale): torch's
    // default allocator's.
    if (!owned) {
      others()->raw_deallocate(p);
    }
    for (const Kept& k : drop) unmap_block(k.ptr, k.size);
  }

  // Moves the oldest kept blocks to `drop` until `room` more bytes fit the limit (mu_ held).
  void trim(int64_t room, std::vector<Kept>& drop) {
    while (!kept_.empty() && kept_bytes_ + room > limit_) drop_oldest(drop);
  }

  // Moves the oldest kept block to `drop` (mu_ held, kept_ not empty); returns the bytes
  // moved to `drop` so far.
  size_t drop_oldest(std::vector<Kept>& drop) {
    size_t oldest = 0;
    for (size_t i = 1; i < kept_.size(); ++i)
      if (kept_[i].freed_at < kept_[oldest].freed_at) oldest = i;
    drop.push_back(kept_[oldest]);
    kept_bytes_ -= static_cast<int64_t>(kept_[oldest].size);
    kept_[oldest] = kept_.back();
    kept_.pop_back();
    size_t total = 0;
    for (const Kept& k : drop) total += k.size;
    return total;
  }

  // Tells torch's profiler (profile_memory=True) about memory handed out (delta > 0) or
  // returned, after the counters were updated (mu_ held).
  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(live_bytes_),
                                     static_cast<size_t>(live_bytes_ + kept_bytes_),
                                     c10::Device(c10::DeviceType::CPU));
  }

  struct Live {
    size_t size;
    uint64_t epoch;  // epoch_ when handed out
  };

  // Records a block handed out (mu_ held). The address may have a stale entry (give_back):
  // the C library freed that block and has now given its memory to us again.
  void add_live(void* p, size_t size) {
    auto [it, added] = live_.try_emplace(p, Live{size, epoch_});
    if (!added) {
      live_bytes_ -= static_cast<int64_t>(it->second.size);
      it->second = Live{size, epoch_};
    }
    live_bytes_ += static_cast<int64_t>(size);
  }

  static void release(void* ptr);
  static void release_raw(void* ptr);

  // The allocator of the pointers freed here that the cache does not own: torch's default CPU
  // allocator, the only one routing replaces (see cpu_cache_route_torch).
  static c10::Allocator* others() { return c10::GetDefaultCPUAllocator(); }

  std::mutex mu_;
  std::vector<Kept> kept_;                // freed blocks waiting for reuse
  std::unordered_map<void*, Live> live_;  // blocks handed out (and maybe stale ones)
  uint64_t epoch_ = 0;                    // times routing was removed
  int64_t kept_bytes_ = 0, live_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
  uint64_t clock_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
CachingCpuAllocator& instance() {
  static CachingCpuAllocator* a = [] {
    auto* created = new CachingCpuAllocator();
#if !defined(_WIN32)
    pthread_atfork([] { instance().before_fork(); }, [] { instance().after_fork_in_parent(); },
                   [] { instance().after_fork_in_child(); });
#endif
    return created;
  }();
  return *a;
}

void CachingCpuAllocator::release(void* ptr) { instance().give_back(ptr, false); }
void CachingCpuAllocator::release_raw(void* ptr) { instance().give_back(ptr, true); }

}  // namespace

c10::Allocator* cpu_allocator() { return &instance(); }

at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, cpu_allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, format);
}

int64_t cpu_cache_release() { return instance().release_all(); }

int64_t cpu_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the CPU cache limit must be non-negative, got ", bytes);
  return instance().set_limit(bytes);
}

std::vector<int64_t> cpu_cache_stats() { return instance().stats(); }

namespace {

// torch's CPU allocator while a routed block is open on some thread: a thread inside a block
// has its requests served by the cache (those of kMinCachedBytes and more; smaller ones by
// torch's default allocator), every other thread by torch's default allocator, which this one
// replaces only for the time being. oneDNN frees its buffers through whatever the CPU
// allocator is at that moment (raw_deallocate): while installed, its raw_deleter takes the
// cache's blocks and others' alike (give_back); once removed, a cache block that oneDNN frees
// goes to the default allocator's free, which releases it (map_block).
class RouteAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override;
  c10::DeleterFnPtr raw_deleter() const override { return instance().raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

std::mutex route_mu;
RouteAllocator* route = nullptr;  // made once, never destroyed: frees may reach it any time
bool installed = false;           // route is torch's CPU allocator (route_mu)
int64_t open_blocks = 0;          // blocks open on all threads (route_mu)
thread_local int64_t depth = 0;   // blocks open on this thread

c10::DataPtr RouteAllocator::allocate(size_t n) {
  return depth > 0 ? instance().allocate(n) : c10::GetDefaultCPUAllocator()->allocate(n);
}

}  // namespace

bool cpu_cache_route_torch(bool on) {
  std::lock_guard<std::mutex> lock(route_mu);
  if (!on) {
    TORCH_CHECK(depth > 0, "maskops: CPU allocations are not routed to the cache on this thread");
    --depth;
    if (--open_blocks == 0 && installed) {
      instance().routing_removed();
      // (Unless an allocator of a higher priority took torch's place meanwhile: it stays.)
      if (c10::GetCPUAllocator() == route) c10::SetCPUAllocator(c10::GetDefaultCPUAllocator());
      installed = false;
    }
    return false;
  }
  ++depth;
  ++open_blocks;
#if defined(MASKOPS_SANITIZED)
  return false;
#else
  // Only torch's default allocator is replaced: the cache's blocks are its kind of memory, and
  // what the route does not serve goes to it. Another library's allocator stays untouched.
  if (!installed && c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator()) {
    if (route == nullptr) route = new RouteAllocator();
    c10::SetCPUAllocator(route);  // priority 0, torch's default allocator's
    installed = c10::GetCPUAllocator() == route;
  }
  return installed && c10::GetCPUAllocator() == route;
#endif
}

std::vector<int64_t> cpu_cache_torch_allocator() {
  std::lock_guard<std::mutex> lock(route_mu);
  auto address = [](const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); };
  return {address(c10::GetCPUAllocator()), address(c10::GetDefaultCPUAllocator()), address(route),
          depth, open_blocks};
}

}  // namespace maskops
