// Argument checks of the box-coding ops, shared by the CPU and CUDA wrappers (host code only).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "boxes/box_coder.h"
#include "common/checks.h"

namespace maskops {
namespace boxes {

inline void check_n4(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == 4, name,
              " must have shape [N, 4] (x1, y1, x2, y2), got ", t.sizes());
}

// Four finite positive weights (wx, wy, ww, wh), converted to the math type T.
template <typename T>
Weights<T> check_weights(at::ArrayRef<double> weights) {
  TORCH_CHECK(weights.size() == 4, "weights must hold 4 numbers (wx, wy, ww, wh), got ",
              weights.size());
  for (double v : weights) {
    TORCH_CHECK(std::isfinite(v) && v > 0, "weights must be finite and positive, got ", weights);
  }
  return {static_cast<T>(weights[0]), static_cast<T>(weights[1]), static_cast<T>(weights[2]),
          static_cast<T>(weights[3])};
}

inline void check_decode(const at::Tensor& rel_codes, const at::Tensor& boxes,
                         at::ArrayRef<double> weights, double clamp) {
  check_floating(rel_codes, "rel_codes");
  TORCH_CHECK(rel_codes.dim() == 2 && rel_codes.size(1) % 4 == 0,
              "rel_codes must have shape [N, 4 * K] (K codes per box), got ", rel_codes.sizes());
  check_n4(boxes, "boxes");
  TORCH_CHECK(rel_codes.size(0) == boxes.size(0), "rel_codes must have one row per box (",
              boxes.size(0), "), got ", rel_codes.size(0));
  check_same_device(rel_codes, boxes, "rel_codes", "boxes");
  check_weights<double>(weights);
  TORCH_CHECK(!std::isnan(clamp), "clamp must be a number, got NaN");
}

inline void check_encode(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                         at::ArrayRef<double> weights) {
  check_n4(reference_boxes, "reference_boxes");
  check_n4(proposals, "proposals");
  TORCH_CHECK(reference_boxes.size(0) == proposals.size(0),
              "reference_boxes and proposals must have the same number of boxes, got ",
              reference_boxes.size(0), " and ", proposals.size(0));
  TORCH_CHECK(reference_boxes.scalar_type() == proposals.scalar_type(),
              "reference_boxes and proposals must have the same dtype, got ",
              reference_boxes.scalar_type(), " and ", proposals.scalar_type());
  check_same_device(reference_boxes, proposals, "reference_boxes", "proposals");
  check_weights<double>(weights);
}

inline void check_clip(const at::Tensor& boxes, int64_t height, int64_t width) {
  check_floating(boxes, "boxes");
  TORCH_CHECK(boxes.dim() >= 1 && boxes.size(-1) == 4,
              "boxes must have shape [..., 4] (x1, y1, x2, y2), got ", boxes.sizes());
  TORCH_CHECK(height >= 0 && width >= 0, "image_size must be non-negative, got (", height, ", ",
              width, ")");
}

inline void check_small(const at::Tensor& boxes, double min_size) {
  check_n4(boxes, "boxes");
  TORCH_CHECK(!std::isnan(min_size), "min_size must be a number, got NaN");
}

}  // namespace boxes
}  // namespace maskops
