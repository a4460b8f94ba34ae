// Segmented NMS, host side (nms.h has the functors): many independent NMS problems of one
// size, e.g. the RPN's per-image proposals, in one pass whose work is the sum of the
// problems' (not the square of their total, as one class-aware NMS over all would be).
//
// Input: S segments of seg_len boxes laid end to end, each segment sorted by decreasing score
// (equal scores in the order the caller wants ties resolved); valid[s] = how many of segment
// s's boxes take part (the first ones); optional class ids (boxes of different classes never
// suppress each other); order[row] = the index to output for sorted row `row`.
// Output: for each segment, its kept indices (order values) in score order at
// index[s * seg_len ...], count[s] of them, at most max_output (< 0: no limit). Both on the
// boxes' device; nothing waits for the device.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "nms/nms.h"

namespace maskops {
namespace nms {

struct SegmentedKept {
  at::Tensor index;  // int64 [S * seg_len]
  at::Tensor count;  // int64 [S]
};

// The CPU test path (the functors on the CPU; nms_cpu.cpp) and the CUDA kernels (nms_cuda.cu),
// both segmented_nms_algo() below. The CPU path takes the shared-memory limit of the walks'
// removed bits (place_removed()) so that a test can run the global-memory layout.
SegmentedKept segmented_nms_cpu(const at::Tensor& boxes, const at::Tensor& classes,
                                const at::Tensor& order, const at::Tensor& valid, int64_t seg_len,
                                double iou_threshold, int64_t max_output,
                                int64_t shared_words = kSharedRemovedWords);
SegmentedKept segmented_nms_cuda(const at::Tensor& boxes, const at::Tensor& classes,
                                 const at::Tensor& order, const at::Tensor& valid, int64_t seg_len,
                                 double iou_threshold, int64_t max_output);

// ---- pieces shared by the two ----

struct SegmentedPlan {
  int64_t segments, seg_len, col_blocks, words;
};

inline SegmentedPlan plan_segmented(const at::Tensor& boxes, const at::Tensor& valid,
                                    int64_t seg_len) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && valid.dim() == 1 &&
                  boxes.size(0) == valid.size(0) * seg_len && boxes.is_contiguous(),
              "segmented nms: boxes must be contiguous [S * seg_len, 4] with S = valid.size(0)");
  SegmentedPlan p;
  p.segments = valid.size(0);
  p.seg_len = seg_len;
  p.col_blocks = (seg_len + kBlock - 1) / kBlock;
  p.words = p.segments * seg_len * p.col_blocks;
  return p;
}

// Outputs with every count 0 (what an empty problem, or max_output 0, returns).
inline SegmentedKept segmented_outputs(const at::Tensor& boxes, const at::Tensor& valid,
                                       int64_t seg_len) {
  const auto opts = boxes.options().dtype(at::kLong);
  return {at::empty({valid.size(0) * seg_len}, opts), at::zeros({valid.size(0)}, opts)};
}

template <typename T>
SegmentedMask<T> segmented_mask(const at::Tensor& boxes, const at::Tensor& classes,
                                const at::Tensor& valid, const SegmentedPlan& p,
                                double iou_threshold, uint64_t* mask) {
  return SegmentedMask<T>{boxes.data_ptr<T>(),
                          classes.defined() ? classes.data_ptr<int64_t>() : nullptr,
                          valid.data_ptr<int64_t>(),
                          p.seg_len,
                          p.col_blocks,
                          threshold_in<T>(iou_threshold),
                          mask};
}

inline SegmentedGather segmented_gather(const uint64_t* mask, const at::Tensor& valid,
                                        const at::Tensor& order, const SegmentedPlan& p,
                                        int64_t max_output, SegmentedKept& kept) {
  return SegmentedGather{mask,
                         valid.data_ptr<int64_t>(),
                         p.seg_len,
                         p.col_blocks,
                         order.data_ptr<int64_t>(),
                         max_output,
                         kept.index.data_ptr<int64_t>(),
                         kept.count.data_ptr<int64_t>()};
}

// The segmented NMS, host side, written once for the CUDA wrapper and its CPU twin: the plan,
// the mask, where the walks keep their removed bits (place_removed(), one global buffer for
// all segments past shared_words), the gather. `launch` supplies the backend's part:
//   launch.check(plan)                              the backend's size limits;
//   launch.segmented_mask(f, plan)                  every tile of SegmentedMask<T> f;
//   launch.segmented_gather(g, plan, placement, removed_global)
//                                                   one walk per segment (walk_removed()).
template <typename Launch>
SegmentedKept segmented_nms_algo(const at::Tensor& boxes, const at::Tensor& classes,
                                 const at::Tensor& order, const at::Tensor& valid, int64_t seg_len,
                                 double iou_threshold, int64_t max_output, int64_t shared_words,
                                 const Launch& launch) {
  const SegmentedPlan plan = plan_segmented(boxes, valid, seg_len);
  SegmentedKept kept = segmented_outputs(boxes, valid, seg_len);
  if (plan.words == 0 || max_output == 0) return kept;
  launch.check(plan);
  const auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor mask = at::empty({plan.words}, long_opts);
  uint64_t* mp = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "segmented_nms_mask", [&] {
    launch.segmented_mask(segmented_mask<scalar_t>(boxes, classes, valid, plan, iou_threshold, mp),
                          plan);
  });
  const SegmentedGather g = segmented_gather(mp, valid, order, plan, max_output, kept);
  const RemovedPlacement rp = place_removed(plan.col_blocks, plan.segments, shared_words);
  at::Tensor removed_global;
  if (rp.global_words > 0) removed_global = at::empty({rp.global_words}, long_opts);
  launch.segmented_gather(g, plan, rp,
                          removed_global.defined()
                              ? reinterpret_cast<uint64_t*>(removed_global.data_ptr<int64_t>())
                              : nullptr);
  return kept;
}

}  // namespace nms
}  // namespace maskops
