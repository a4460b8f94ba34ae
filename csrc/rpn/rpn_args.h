// Argument checks of rpn_proposals, shared by the CPU and CUDA wrappers (host code only).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace maskops {
namespace rpn {

inline void check_args(const at::Tensor& objectness, const at::Tensor& deltas,
                       const at::Tensor& anchors, at::IntArrayRef image_sizes,
                       int64_t pre_nms_top_n, int64_t post_nms_top_n, double nms_thresh,
                       double score_thresh, double min_size,
                       at::IntArrayRef num_anchors_per_level) {
  check_floating(objectness, "objectness");
  check_floating(deltas, "deltas");
  check_floating(anchors, "anchors");
  TORCH_CHECK(objectness.dim() == 2,
              "objectness must have shape [B, A] (one logit per anchor), got ", objectness.sizes());
  const int64_t B = objectness.size(0), A = objectness.size(1);
  TORCH_CHECK(
      deltas.dim() == 3 && deltas.size(0) == B && deltas.size(1) == A && deltas.size(2) == 4,
      "deltas must have shape [B, A, 4] = [", B, ", ", A, ", 4], got ", deltas.sizes());
  TORCH_CHECK((anchors.dim() == 2 && anchors.size(0) == A && anchors.size(1) == 4) ||
                  (anchors.dim() == 3 && anchors.size(0) == B && anchors.size(1) == A &&
                   anchors.size(2) == 4),
              "anchors must have shape [A, 4] or [B, A, 4] with A = ", A, ", B = ", B, ", got ",
              anchors.sizes());
  check_same_device(objectness, deltas, "objectness", "deltas");
  check_same_device(objectness, anchors, "objectness", "anchors");
  TORCH_CHECK(static_cast<int64_t>(image_sizes.size()) == 2 * B,
              "image_sizes must hold (height, width) for each of the ", B, " images (", 2 * B,
              " values), got ", image_sizes.size());
  for (int64_t v : image_sizes) {
    TORCH_CHECK(v >= 0, "image_sizes must be non-negative, got ", image_sizes);
  }
  TORCH_CHECK(pre_nms_top_n >= 0, "pre_nms_top_n must be non-negative, got ", pre_nms_top_n);
  TORCH_CHECK(post_nms_top_n >= 0, "post_nms_top_n must be non-negative, got ", post_nms_top_n);
  TORCH_CHECK(!std::isnan(nms_thresh), "nms_thresh must be a number, got NaN");
  TORCH_CHECK(!std::isnan(score_thresh), "score_thresh must be a number, got NaN");
  TORCH_CHECK(!std::isnan(min_size) && min_size >= 0,
              "min_size must be a non-negative number, got ", min_size);
  int64_t total = 0;
  for (int64_t n : num_anchors_per_level) {
    TORCH_CHECK(n >= 0, "num_anchors_per_level must be non-negative, got ", num_anchors_per_level);
    total += n;
  }
  TORCH_CHECK(total == A, "num_anchors_per_level must add up to the number of anchors A = ", A,
              ", got ", num_anchors_per_level, " (sum ", total, ")");
}

}  // namespace rpn
}  // namespace maskops
