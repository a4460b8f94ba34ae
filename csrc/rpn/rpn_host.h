// Host-side pieces of rpn_proposals shared by the CPU and CUDA files: the per-level top-k, and
// the GPU algorithm (written once over a launcher and an NMS op, so the test-only CPU op runs
// it too). The argument checks are in rpn_args.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "nms/segmented_nms.h"
#include "rpn/rpn.h"

namespace maskops {
namespace rpn {

using Proposals = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

// torchvision's RPN box coder: weights (1, 1, 1, 1) and dw, dh clamped at log(1000 / 16).
constexpr double kClip = 4.135166556742356;

// maskops::batched_nms, called through the dispatcher (the CPU algorithm's per-image NMS).
inline at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores,
                              const at::Tensor& classes, double iou_threshold,
                              std::optional<double> score_threshold,
                              std::optional<int64_t> max_output) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("maskops::batched_nms", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            std::optional<double>, std::optional<int64_t>)>();
  return op.call(boxes, scores, classes, iou_threshold, score_threshold, max_output);
}

// The candidates: per level, the indices of the min(pre_nms_top_n, level size) largest
// logits of each image, by decreasing logit, levels one after another ([B, K], on the
// objectness' device), and the level of each of the K positions. The top-k is torch.topk on
// the same slices torchvision passes it, so equal logits resolve exactly as they do there.
struct TopN {
  at::Tensor index;
  std::vector<int64_t> level_of;
};

inline TopN top_n(const at::Tensor& objectness, at::IntArrayRef num_anchors_per_level,
                  int64_t pre_nms_top_n) {
  TopN t;
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t l = 0; l < num_anchors_per_level.size(); ++l) {
    const int64_t n = num_anchors_per_level[l];
    const int64_t k = std::min(pre_nms_top_n, n);
    if (k > 0) {
      at::Tensor idx = std::get<1>(at::topk(objectness.narrow(1, offset, n), k, 1,
                                            /*largest=*/true, /*sorted=*/true));
      parts.push_back(offset == 0 ? idx : idx.add(offset));
      t.level_of.insert(t.level_of.end(), k, static_cast<int64_t>(l));
    }
    offset += n;
  }
  t.index = parts.empty()
                ? at::empty({objectness.size(0), 0}, objectness.options().dtype(at::kLong))
                : at::cat(parts, 1).contiguous();
  return t;
}

// `logits` is the objectness [B, A] in T, or null where only the passes that take the scores
// ready-made run.
template <typename T>
Candidates<T> make_candidates(const T* logits, const at::Tensor& deltas, const at::Tensor& anchors,
                              const at::Tensor& index, const int64_t* image_sizes,
                              double score_thresh, double min_size) {
  Candidates<T> c;
  c.objectness = logits;
  c.deltas = deltas.data_ptr<T>();
  c.anchors = anchors.data_ptr<T>();
  c.anchors_image_stride = anchors.dim() == 3 ? 4 * anchors.size(1) : 0;
  c.index = index.data_ptr<int64_t>();
  c.image_sizes = image_sizes;
  c.num_anchors = deltas.size(1);
  c.per_image = index.size(1);
  c.w = {T(1), T(1), T(1), T(1)};
  c.clip = static_cast<T>(kClip);
  // torchvision compares with the thresholds as tensors of the scores' / boxes' dtype.
  c.min_size = static_cast<T>(min_size);
  c.score_thresh = static_cast<T>(score_thresh);
  return c;
}

// The GPU algorithm: one Candidate pass over every candidate of every image; per image, its
// candidates sorted by NMS score (a stable sort of each row of [B, K], so rejected candidates,
// at -inf, come last and ties go by index, as in torchvision); then one segmented NMS
// (nms/segmented_nms.h) with a segment per image, over only its candidates that were not
// rejected, class-aware by level, stopping at post_nms_top_n kept. Its work grows linearly
// with the batch. `launch(n, functor)` runs a functor over [0, n); `nms` is
// nms::segmented_nms_cuda or its CPU twin nms::segmented_nms_cpu.
// Host synchronisation (on CUDA): one, reading how many proposals each image kept (the
// outputs' sizes depend on the data).
template <typename Launch, typename Nms>
Proposals proposals_gpu_algo(const at::Tensor& objectness, const at::Tensor& deltas,
                             const at::Tensor& anchors, at::IntArrayRef image_sizes,
                             int64_t pre_nms_top_n, int64_t post_nms_top_n, double nms_thresh,
                             double score_thresh, double min_size,
                             at::IntArrayRef num_anchors_per_level, const Launch& launch,
                             const Nms& nms) {
  const int64_t B = objectness.size(0);
  const int64_t L = static_cast<int64_t>(num_anchors_per_level.size());
  const TopN sel = top_n(objectness, num_anchors_per_level, pre_nms_top_n);
  const int64_t K = sel.index.size(1);
  const at::ScalarType mt = math_type(deltas.scalar_type());
  const auto opts = deltas.options().dtype(mt);
  const at::Tensor obj = objectness.to(mt).contiguous();
  const at::Tensor del = deltas.to(mt).contiguous();
  const at::Tensor anc = anchors.to(mt).contiguous();
  // Image sizes, then the level of each candidate position: one small copy to the device.
  at::Tensor meta = at::empty({2 * B + K}, at::TensorOptions().dtype(at::kLong));
  int64_t* mp = meta.data_ptr<int64_t>();
  std::copy(image_sizes.begin(), image_sizes.end(), mp);
  std::copy(sel.level_of.begin(), sel.level_of.end(), mp + 2 * B);
  // From pinned memory without waiting (a pageable copy would block the host); the pinned
  // block stays reserved until the copy has run.
  if (deltas.is_cuda())
    meta = meta.pin_memory().to(deltas.device(), at::kLong, /*non_blocking=*/true);

  at::Tensor boxes = at::empty({B * K, 4}, opts);
  at::Tensor scores = at::empty({B * K}, opts);
  at::Tensor nms_scores = at::empty({B * K}, opts);
  at::Tensor classes = at::empty({B * K}, opts.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(mt, "rpn_candidates", [&] {
    using T = scalar_t;
    const Candidate<T> f{make_candidates<T>(obj.data_ptr<T>(), del, anc, sel.index,
                                            meta.data_ptr<int64_t>(), score_thresh, min_size),
                         meta.data_ptr<int64_t>() + 2 * B,
                         L,
                         boxes.data_ptr<T>(),
                         scores.data_ptr<T>(),
                         nms_scores.data_ptr<T>(),
                         classes.data_ptr<int64_t>()};
    launch(B * K, f);
  });
  // Per image: candidates by decreasing NMS score; row r of image b is candidate b * K + local.
  const auto by_score = at::sort(nms_scores.view({B, K}), /*stable=*/true, /*dim=*/1,
                                 /*descending=*/true);
  const at::Tensor order = std::get<1>(by_score)
                               .add(at::arange(B, classes.options()).mul(K).unsqueeze(1))
                               .reshape({B * K});
  const at::Tensor valid = std::get<0>(by_score)
                               .gt(-std::numeric_limits<double>::infinity())
                               .sum(at::IntArrayRef{1}, /*keepdim=*/false, at::kLong);
  const nms::SegmentedKept kept =
      nms(boxes.index_select(0, order).contiguous(), classes.index_select(0, order).contiguous(),
          order, valid, K, nms_thresh, post_nms_top_n);
  const at::Tensor counts = kept.count.cpu();  // the one host synchronisation
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<at::Tensor> out_boxes, out_scores;
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor idx = kept.index.narrow(0, b * K, cp[b]);
    out_boxes.push_back(boxes.index_select(0, idx).to(deltas.scalar_type()));
    out_scores.push_back(scores.index_select(0, idx).to(objectness.scalar_type()));
  }
  return {out_boxes, out_scores};
}

}  // namespace rpn
}  // namespace maskops
