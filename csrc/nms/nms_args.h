// Argument checks of the NMS ops, shared by the CPU and CUDA wrappers (host code only).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/checks.h"

namespace maskops {
namespace nms {

inline void check_boxes(const at::Tensor& boxes, const char* name) {
  check_floating(boxes, name);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, name,
              " must have shape [N, 4] (x1, y1, x2, y2), got ", boxes.sizes());
}

inline void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_boxes(boxes1, "boxes1");
  check_boxes(boxes2, "boxes2");
  check_same_device(boxes1, boxes2, "boxes1", "boxes2");
  TORCH_CHECK(boxes1.scalar_type() == boxes2.scalar_type(),
              "boxes1 and boxes2 must have the same dtype, got ", boxes1.scalar_type(), " and ",
              boxes2.scalar_type());
}

inline void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                           const c10::optional<at::Tensor>& idxs, double iou_threshold,
                           c10::optional<double> score_threshold,
                           c10::optional<int64_t> max_output) {
  check_boxes(boxes, "boxes");
  const int64_t n = boxes.size(0);
  check_floating(scores, "scores");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == n, "scores must have shape [", n,
              "] (one score per box), got ", scores.sizes());
  check_same_device(boxes, scores, "boxes", "scores");
  if (idxs.has_value()) {
    const at::Tensor& c = *idxs;
    TORCH_CHECK(at::isIntegralType(c.scalar_type(), /*includeBool=*/false),
                "idxs must be an integer tensor, got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 1 && c.size(0) == n, "idxs must have shape [", n,
                "] (one class index per box), got ", c.sizes());
    check_same_device(boxes, c, "boxes", "idxs");
  }
  TORCH_CHECK(!std::isnan(iou_threshold), "iou_threshold must be a number, got NaN");
  TORCH_CHECK(!score_threshold.has_value() || !std::isnan(*score_threshold),
              "score_threshold must be a number or None, got NaN");
  TORCH_CHECK(!max_output.has_value() || *max_output >= 0,
              "max_output must be non-negative or None, got ", max_output.value_or(0));
}

}  // namespace nms
}  // namespace maskops
