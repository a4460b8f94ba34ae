// NMS, box IoU and box area on the CPU.
//
// nms: one stable sort of the scores, then greedy suppression over a structure of arrays
// (x1[], y1[], x2[], y2[], area[]) in score order. Candidates are taken kChunk at a time: a
// chunk is settled serially (each box kept suppresses the rest of the chunk), then the chunk's
// kept boxes suppress all later candidates in one pass over L1-sized tiles, in parallel when
// there is enough work. Suppressed candidates are compacted away once they make up an eighth
// of the remainder, so the passes run over (nearly) live boxes only.
//
// batched_nms: the sorted boxes are grouped by class (within a class they stay in score order)
// and each class runs the same greedy loop: boxes of different classes are never compared,
// the cheapest form of a class-aware IoU test, and coordinates are never offset (offsets
// would round coordinates and could change IoU decisions). Small classes run in parallel.
//
// Output: kept indices in score order, ties by index (the stable sort), like torchvision.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/host_device.h"
#include "nms/nms_args.h"

// From here on no fused multiply-adds: the op's math rounds as torch's (see the header).
#include "common/no_fp_contract.h"

#include "nms/nms.h"
#include "nms/nms_host.h"
#include "nms/segmented_nms.h"

namespace maskops {
namespace nms {
namespace {

// Candidates settled serially before one pass over the rest.
constexpr int64_t kChunk = 256;
// Candidates per task in a pass: five arrays of 1024 floats fit L1.
constexpr int64_t kTile = 1024;
// Pair tests (about 2 ms on one core) below which a pass runs on one thread. A parallel
// region waits for every thread to be scheduled: on a busy machine that can take a whole
// time slice, so a region is only worth it with plenty of work (measured: with 2^17 here,
// 20,000 boxes ran 1.5x faster on 2 idle cores but 15x slower with one core taken).
constexpr int64_t kParallelPairs = int64_t(1) << 23;
// Classes at least this large run one at a time with a parallel inner loop.
constexpr int64_t kBigClass = 4096;

// GCC vectors of `Bytes` bytes of T, and a lane mask of the same width. Each SIMD level
// gets its register width (64 for AVX-512, 32 for AVX2, 16 for SSE2): wider vectors than the
// target's registers are lowered lane by lane for the selects in nms_overlap().
template <typename T, int Bytes = 64>
struct Simd;
template <int Bytes>
struct Simd<float, Bytes> {
  typedef float V __attribute__((vector_size(Bytes)));
  typedef int32_t M;
  typedef int32_t VM __attribute__((vector_size(Bytes)));
};
template <int Bytes>
struct Simd<double, Bytes> {
  typedef double V __attribute__((vector_size(Bytes)));
  typedef int64_t M;
  typedef int64_t VM __attribute__((vector_size(Bytes)));
};

template <typename X>
inline X load(const void* p) {
  X v;
  __builtin_memcpy(&v, p, sizeof(X));
  return v;
}
template <typename X>
inline void store(void* p, X v) {
  __builtin_memcpy(p, &v, sizeof(X));
}

// Boxes as separate coordinate arrays; `alive` is a lane mask (-1 alive, 0 suppressed).
template <typename T>
struct BoxArrays {
  T *x1, *y1, *x2, *y2, *area;
  typename Simd<T>::M* alive;
};

// alive[j] = 0 for j in [begin, end) when one of the kept boxes `lead[0, nk)` suppresses j.
template <int Bytes, typename T>
inline __attribute__((always_inline)) void suppress_impl(BoxArrays<T> lead, int64_t nk,
                                                         BoxArrays<T> c, int64_t begin, int64_t end,
                                                         T thr) {
  using V = typename Simd<T, Bytes>::V;
  using VM = typename Simd<T, Bytes>::VM;
  constexpr int64_t L = Bytes / sizeof(T);
  const V vthr = V{} + thr;
  for (int64_t k = 0; k < nk; ++k) {
    const V ax1 = V{} + lead.x1[k], ay1 = V{} + lead.y1[k];
    const V ax2 = V{} + lead.x2[k], ay2 = V{} + lead.y2[k];
    const V aa = V{} + lead.area[k];
    int64_t j = begin;
    for (; j + L <= end; j += L) {
      const V bx1 = load<V>(c.x1 + j), by1 = load<V>(c.y1 + j);
      const V bx2 = load<V>(c.x2 + j), by2 = load<V>(c.y2 + j);
      const V ov = nms_overlap(ax1, ay1, ax2, ay2, aa, bx1, by1, bx2, by2, load<V>(c.area + j));
      const VM hit = ov > vthr;
      store(c.alive + j, load<VM>(c.alive + j) & ~hit);
    }
    for (; j < end; ++j) {
      if (nms_overlap(lead.x1[k], lead.y1[k], lead.x2[k], lead.y2[k], lead.area[k], c.x1[j],
                      c.y1[j], c.x2[j], c.y2[j], c.area[j]) > thr)
        c.alive[j] = 0;
    }
  }
}

// Compiled for AVX-512, AVX2 and portable code, each with its register width; each call
// takes maskops::cpu_isa()'s.
MASKOPS_ISA_VARIANTS_WIDTH(void, suppress,
                           (BoxArrays<float> lead, int64_t nk, BoxArrays<float> c, int64_t begin,
                            int64_t end, float thr),
                           (lead, nk, c, begin, end, thr), suppress_impl)
MASKOPS_ISA_VARIANTS_WIDTH(void, suppress,
                           (BoxArrays<double> lead, int64_t nk, BoxArrays<double> c, int64_t begin,
                            int64_t end, double thr),
                           (lead, nk, c, begin, end, thr), suppress_impl)

// The boxes of one class (or all boxes) in score order, compacted as they are suppressed.
template <typename T>
struct Candidates {
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<int64_t> pos;  // position in the global score order
  std::vector<typename Simd<T>::M> alive;
  int64_t n = 0;

  // Box k = the box at score position positions[k] (or k when positions is null).
  void fill(const T* boxes, const int64_t* order, const int64_t* positions, int64_t count) {
    n = count;
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(count);
    pos.resize(count);
    alive.assign(count, -1);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t p = positions != nullptr ? positions[k] : k;
      const T* b = boxes + 4 * order[p];
      x1[k] = b[0];
      y1[k] = b[1];
      x2[k] = b[2];
      y2[k] = b[3];
      // The same expression as torchvision's precomputed areas.
      area[k] = box_area_of(b[0], b[1], b[2], b[3]);
      pos[k] = p;
    }
  }

  BoxArrays<T> arrays() {
    return {x1.data(), y1.data(), x2.data(), y2.data(), area.data(), alive.data()};
  }

  // Drops suppressed candidates at or after `from`, keeping their order.
  void compact(int64_t from) {
    int64_t w = from;
    for (int64_t r = from; r < n; ++r) {
      if (!alive[r]) continue;
      x1[w] = x1[r];
      y1[w] = y1[r];
      x2[w] = x2[r];
      y2[w] = y2[r];
      area[w] = area[r];
      pos[w] = pos[r];
      alive[w] = -1;
      ++w;
    }
    n = w;
  }
};

// Greedy NMS over c. Sets kept[pos] for every box kept. Boxes at positions >= first_emit
// count towards max_emit (< 0: no limit); the walk stops when max_emit of them are kept.
template <typename T>
void greedy(Candidates<T>& c, T thr, int64_t first_emit, int64_t max_emit, bool parallel,
            uint8_t* kept) {
  std::vector<T> lx1(kChunk), ly1(kChunk), lx2(kChunk), ly2(kChunk), la(kChunk);
  BoxArrays<T> lead{lx1.data(), ly1.data(), lx2.data(), ly2.data(), la.data(), nullptr};
  int64_t emitted = 0;
  for (int64_t lo = 0; lo < c.n;) {
    const int64_t hi = std::min(lo + kChunk, c.n);
    BoxArrays<T> a = c.arrays();
    int64_t nk = 0;
    for (int64_t p = lo; p < hi; ++p) {
      if (!a.alive[p]) continue;
      kept[c.pos[p]] = 1;
      if (c.pos[p] >= first_emit && ++emitted == max_emit) return;
      lx1[nk] = a.x1[p];
      ly1[nk] = a.y1[p];
      lx2[nk] = a.x2[p];
      ly2[nk] = a.y2[p];
      la[nk] = a.area[p];
      ++nk;
      BoxArrays<T> one{lx1.data() + nk - 1, ly1.data() + nk - 1, lx2.data() + nk - 1,
                       ly2.data() + nk - 1, la.data() + nk - 1,  nullptr};
      suppress(one, 1, a, p + 1, hi, thr);
    }
    const int64_t rest = c.n - hi;
    if (rest > 0 && nk > 0) {
      const int64_t tiles = (rest + kTile - 1) / kTile;
      std::atomic<int64_t> dead{0};
      auto pass = [&](int64_t t0, int64_t t1) {
        int64_t d = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = hi + t * kTile, e = std::min(b + kTile, c.n);
          suppress(lead, nk, a, b, e, thr);
          for (int64_t j = b; j < e; ++j) d += a.alive[j] == 0;
        }
        dead += d;
      };
      if (parallel && tiles > 1 && nk * rest >= kParallelPairs) {
        at::parallel_for(0, tiles, 1, pass);
      } else {
        pass(0, tiles);
      }
      if (dead.load() * 8 >= rest) c.compact(hi);
    }
    lo = hi;
  }
}

// Score positions [0, n) grouped by class, each group in score order. Returns group starts
// (plus n at the end) in `starts`.
void group_by_class(const int64_t* cls, int64_t n, std::vector<int64_t>& perm,
                    std::vector<int64_t>& starts) {
  perm.resize(n);
  starts.clear();
  const auto mm = std::minmax_element(cls, cls + n);
  const uint64_t range = static_cast<uint64_t>(*mm.second) - static_cast<uint64_t>(*mm.first);
  if (range <= static_cast<uint64_t>(2 * n + 1024)) {  // counting sort: stable, O(n)
    const int64_t lo = *mm.first;
    std::vector<int64_t> next(range + 2, 0);
    for (int64_t p = 0; p < n; ++p) ++next[cls[p] - lo + 1];
    for (uint64_t k = 1; k < next.size(); ++k) {
      if (next[k] > 0) starts.push_back(next[k - 1]);
      next[k] += next[k - 1];
    }
    for (int64_t p = 0; p < n; ++p) perm[next[cls[p] - lo]++] = p;
  } else {
    std::iota(perm.begin(), perm.end(), int64_t(0));
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return cls[a] < cls[b]; });
    for (int64_t k = 0; k < n; ++k)
      if (k == 0 || cls[perm[k]] != cls[perm[k - 1]]) starts.push_back(k);
  }
  starts.push_back(n);
}

// Runs greedy() on every class group. Big groups go one at a time with a parallel inner
// loop; the rest are shared among threads, largest first.
template <typename T>
void greedy_by_class(const T* boxes, const int64_t* order, const int64_t* perm,
                     const std::vector<int64_t>& starts, T thr, int64_t first_emit,
                     int64_t max_emit, uint8_t* kept) {
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  std::vector<int64_t> by_size(groups);
  std::iota(by_size.begin(), by_size.end(), int64_t(0));
  auto size = [&](int64_t g) { return starts[g + 1] - starts[g]; };
  std::stable_sort(by_size.begin(), by_size.end(),
                   [&](int64_t a, int64_t b) { return size(a) > size(b); });
  int64_t g0 = 0, small_pairs = 0;
  Candidates<T> c;
  for (; g0 < groups && size(by_size[g0]) >= kBigClass; ++g0) {
    const int64_t g = by_size[g0];
    c.fill(boxes, order, perm + starts[g], size(g));
    greedy(c, thr, first_emit, max_emit, /*parallel=*/true, kept);
  }
  for (int64_t k = g0; k < groups; ++k) small_pairs += size(by_size[k]) * size(by_size[k]) / 2;
  std::atomic<int64_t> next{g0};
  auto worker = [&](int64_t, int64_t) {
    Candidates<T> local;
    for (int64_t k = next++; k < groups; k = next++) {
      const int64_t g = by_size[k];
      local.fill(boxes, order, perm + starts[g], size(g));
      greedy(local, thr, first_emit, max_emit, /*parallel=*/false, kept);
    }
  };
  if (small_pairs >= kParallelPairs && at::get_num_threads() > 1) {
    at::parallel_for(0, at::get_num_threads(), 1, worker);
  } else {
    worker(0, 1);
  }
}

// The sort and threshold bookkeeping shared by nms, batched_nms and _nms_bitmask.
struct Sorted {
  at::Tensor order;        // int64 [n]: score position -> box index
  at::Tensor values;       // sorted scores
  int64_t n_eff = 0;       // positions past n_eff are never output and suppress nothing output
  int64_t first_emit = 0;  // positions below first_emit (NaN scores) are never output
};

Sorted sort_scores(const at::Tensor& scores, c10::optional<double> score_threshold) {
  Sorted s;
  // Stable and descending, like torchvision: equal scores go by index, NaN scores first.
  auto sorted = at::sort(scores.contiguous(), /*stable=*/true, /*dim=*/0, /*descending=*/true);
  s.values = std::get<0>(sorted);
  s.order = std::get<1>(sorted).contiguous();
  const int64_t n = scores.size(0);
  s.n_eff = n;
  if (score_threshold.has_value()) {
    const double thr = *score_threshold;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.values.scalar_type(),
                                    "nms_score_threshold", [&] {
                                      const scalar_t* v = s.values.data_ptr<scalar_t>();
                                      int64_t k = 0;
                                      while (k < n && std::isnan(static_cast<double>(v[k]))) ++k;
                                      s.first_emit = k;
                                      while (k<n&& static_cast<double>(v[k])> thr) ++k;
                                      s.n_eff = k;
                                    });
  }
  return s;
}

at::Tensor empty_indices(const at::Tensor& like) {
  return at::empty({0}, like.options().dtype(at::kLong));
}

at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores,
                    const c10::optional<at::Tensor>& idxs, double iou_threshold,
                    c10::optional<double> score_threshold, c10::optional<int64_t> max_output) {
  check_nms_args(boxes, scores, idxs, iou_threshold, score_threshold, max_output);
  const int64_t n = boxes.size(0);
  if (n == 0 || max_output.value_or(1) == 0) return empty_indices(boxes);
  const Sorted s = sort_scores(scores, score_threshold);
  const int64_t m = s.n_eff;
  if (m == s.first_emit) return empty_indices(boxes);
  const int64_t max_emit = max_output.value_or(-1);
  const int64_t* order = s.order.data_ptr<int64_t>();
  const at::Tensor bm = boxes.to(math_type(boxes.scalar_type())).contiguous();
  std::vector<uint8_t> kept(m, 0);
  AT_DISPATCH_FLOATING_TYPES(bm.scalar_type(), "nms_cpu", [&] {
    using T = scalar_t;
    const T thr = threshold_in<T>(iou_threshold);
    const T* bp = bm.data_ptr<T>();
    if (!idxs.has_value()) {
      Candidates<T> c;
      c.fill(bp, order, nullptr, m);
      greedy(c, thr, s.first_emit, max_emit, /*parallel=*/true, kept.data());
    } else {
      const at::Tensor ci = idxs->to(at::kLong).contiguous();
      const int64_t* cp = ci.data_ptr<int64_t>();
      std::vector<int64_t> cls(m), perm, starts;
      for (int64_t p = 0; p < m; ++p) cls[p] = cp[order[p]];
      group_by_class(cls.data(), m, perm, starts);
      greedy_by_class(bp, order, perm.data(), starts, thr, s.first_emit, max_emit, kept.data());
    }
  });
  int64_t count = 0;
  for (int64_t p = s.first_emit; p < m; ++p) count += kept[p];
  if (max_emit >= 0) count = std::min(count, max_emit);
  at::Tensor out = at::empty({count}, boxes.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t p = s.first_emit, k = 0; k < count; ++p)
    if (kept[p]) op[k++] = order[p];
  return out;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                   c10::optional<double> score_threshold, c10::optional<int64_t> max_output) {
  return nms_impl(boxes, scores, c10::nullopt, iou_threshold, score_threshold, max_output);
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold,
                           c10::optional<double> score_threshold,
                           c10::optional<int64_t> max_output) {
  return nms_impl(boxes, scores, idxs, iou_threshold, score_threshold, max_output);
}

// ---- Test-only: the CUDA algorithm (nms_host.h, nms.h's mask_tile() and walk()) on the CPU ----

// The CPU part of nms_gpu_algo() and segmented_nms_algo(): the mask tiles in parallel, each
// walk by one thread. Shared memory is a local array here. It, and the global buffer, start
// with every bit set, as uninitialised memory might be on the GPU: walk() must clear them.
struct CpuLaunch {
  void check(int64_t) const {}
  void check(const SegmentedPlan&) const {}
  template <typename T>
  void mask(const MaskBlock<T>& f) const {
    cpu_for_each(f.col_blocks * f.col_blocks, 4, [&](int64_t i) {
      T cols[4 * kBlock];
      int64_t col_classes[kBlock];
      mask_tile(f, i / f.col_blocks, i % f.col_blocks, 0, 1, cols, col_classes, NoSync{});
    });
  }
  template <typename T>
  void segmented_mask(const SegmentedMask<T>& f, const SegmentedPlan& plan) const {
    const int64_t tiles = plan.col_blocks * plan.col_blocks;
    cpu_for_each(plan.segments * tiles, 4, [&](int64_t i) {
      T cols[4 * kBlock];
      int64_t col_classes[kBlock];
      const int64_t t = i % tiles;
      mask_tile(f.segment(i / tiles), t / plan.col_blocks, t % plan.col_blocks, 0, 1, cols,
                col_classes, NoSync{});
    });
  }
  static void poison(uint64_t* p, int64_t words) { std::fill(p, p + words, ~uint64_t(0)); }
  void gather(const GatherKept& g, const RemovedPlacement& rp, uint64_t* removed_global,
              int64_t* count) const {
    if (removed_global != nullptr) poison(removed_global, rp.global_words);
    std::vector<uint64_t> shared(rp.shared_words, ~uint64_t(0));
    WalkShared sh;
    *count =
        walk(g, walk_removed(removed_global, shared.data(), 0, g.col_blocks), sh, 0, 1, NoSync{});
  }
  void segmented_gather(const SegmentedGather& g, const SegmentedPlan& plan,
                        const RemovedPlacement& rp, uint64_t* removed_global) const {
    if (removed_global != nullptr) poison(removed_global, rp.global_words);
    cpu_for_each(plan.segments, 1, [&](int64_t s) {
      std::vector<uint64_t> shared(rp.shared_words, ~uint64_t(0));
      WalkShared sh;
      g.count[s] = walk(g.segment(s), walk_removed(removed_global, shared.data(), s, g.col_blocks),
                        sh, 0, 1, NoSync{});
    });
  }
};

int64_t shared_limit(c10::optional<int64_t> removed_shared_words) {
  const int64_t w = removed_shared_words.value_or(kSharedRemovedWords);
  TORCH_CHECK(w >= 0 && w <= kSharedRemovedWords, "removed_shared_words must be in [0, ",
              kSharedRemovedWords, "] (the GPU's limit) or None, got ", w);
  return w;
}

at::Tensor nms_bitmask_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const c10::optional<at::Tensor>& idxs, double iou_threshold,
                           c10::optional<double> score_threshold, c10::optional<int64_t> max_output,
                           c10::optional<int64_t> removed_shared_words) {
  return nms_gpu_algo(boxes, scores, idxs, iou_threshold, score_threshold, max_output,
                      shared_limit(removed_shared_words), CpuLaunch{});
}

// ---- box_area, box_iou ----

at::Tensor box_area_cpu(const at::Tensor& boxes) {
  check_boxes(boxes, "boxes");
  const at::Tensor b = boxes.contiguous();
  at::Tensor out = at::empty({b.size(0)}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "box_area_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    cpu_for_each(b.size(0), 4096,
                 BoxArea<scalar_t, T>{b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  const at::Tensor a = boxes1.contiguous(), b = boxes2.contiguous();
  const int64_t n = a.size(0), m = b.size(0);
  at::Tensor out = at::empty({n, m}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const BoxIoU<scalar_t, T> f{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), m,
                                out.data_ptr<scalar_t>()};
    // One row per iteration; rows are grouped so that a task has at least ~16k pairs.
    cpu_for_each(n, std::max<int64_t>(1, 16384 / m), [&](int64_t i) {
      for (int64_t j = 0; j < m; ++j) f.element(i, j);
    });
  });
  return out;
}

}  // namespace

// Segmented NMS with the GPU algorithm's loops (mask_tile() per segment's tile, then walk() per
// segment).
SegmentedKept segmented_nms_cpu(const at::Tensor& boxes, const at::Tensor& classes,
                                const at::Tensor& order, const at::Tensor& valid, int64_t seg_len,
                                double iou_threshold, int64_t max_output, int64_t shared_words) {
  return segmented_nms_algo(boxes, classes, order, valid, seg_len, iou_threshold, max_output,
                            shared_words, CpuLaunch{});
}

namespace {

// Test-only: segmented_nms_cpu() with its arguments checked (the RPN builds them correctly).
std::tuple<at::Tensor, at::Tensor> segmented_nms_op(const at::Tensor& boxes,
                                                    const c10::optional<at::Tensor>& classes,
                                                    const at::Tensor& order,
                                                    const at::Tensor& valid, int64_t seg_len,
                                                    double iou_threshold, int64_t max_output,
                                                    c10::optional<int64_t> removed_shared_words) {
  check_boxes(boxes, "boxes");
  TORCH_CHECK(seg_len >= 0, "seg_len must be non-negative, got ", seg_len);
  TORCH_CHECK(valid.scalar_type() == at::kLong && valid.dim() == 1,
              "valid must be an int64 tensor [S], got ", valid.scalar_type(), " ", valid.sizes());
  const int64_t rows = valid.size(0) * seg_len;
  TORCH_CHECK(boxes.size(0) == rows, "boxes must have S * seg_len = ", rows, " rows, got ",
              boxes.size(0));
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == rows,
              "order must be an int64 tensor [", rows, "], got ", order.scalar_type(), " ",
              order.sizes());
  TORCH_CHECK(!classes.has_value() || (classes->scalar_type() == at::kLong && classes->dim() == 1 &&
                                       classes->size(0) == rows),
              "classes must be an int64 tensor [", rows, "] or None");
  const at::Tensor v = valid.contiguous();
  const int64_t* vp = v.data_ptr<int64_t>();
  for (int64_t s = 0; s < v.size(0); ++s)
    TORCH_CHECK(vp[s] >= 0 && vp[s] <= seg_len, "valid[", s, "] must be in [0, seg_len = ", seg_len,
                "], got ", vp[s]);
  const SegmentedKept kept = segmented_nms_cpu(
      boxes.to(math_type(boxes.scalar_type())).contiguous(),
      classes.has_value() ? classes->contiguous() : at::Tensor(), order.contiguous(), v, seg_len,
      iou_threshold, max_output, shared_limit(removed_shared_words));
  // Entries past a segment's count are -1 (not left uninitialised), so the output is a
  // function of the input.
  int64_t* ip = kept.index.data_ptr<int64_t>();
  const int64_t* cp = kept.count.data_ptr<int64_t>();
  for (int64_t s = 0; s < v.size(0); ++s)
    std::fill(ip + s * seg_len + cp[s], ip + (s + 1) * seg_len, int64_t(-1));
  return {kept.index, kept.count};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("box_area", &box_area_cpu);
  m.impl("box_iou", &box_iou_cpu);
}

TORCH_LIBRARY_IMPL(maskops_testing, CPU, m) {
  m.impl("_nms_bitmask", &nms_bitmask_cpu);
  m.impl("_segmented_nms", &segmented_nms_op);
}

}  // namespace nms
}  // namespace maskops
