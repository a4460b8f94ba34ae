// Argument checks of paste_masks, shared by the CPU and CUDA wrappers (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace maskops {
namespace paste_masks {

inline void check_args(const at::Tensor& masks, const at::Tensor& boxes, int64_t height,
                       int64_t width, int64_t padding) {
  check_floating(masks, "masks");
  check_dim(masks, 4, "masks");
  TORCH_CHECK(masks.size(2) == masks.size(3), "masks must be square ([N, C, M, M]), got ",
              masks.sizes());
  check_floating(boxes, "boxes");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must have shape [N, 4], got ",
              boxes.sizes());
  TORCH_CHECK(boxes.size(0) == masks.size(0), "boxes must have one row per mask (", masks.size(0),
              "), got ", boxes.size(0));
  check_same_device(masks, boxes, "masks", "boxes");
  TORCH_CHECK(height >= 0 && width >= 0, "image_size must be non-negative, got (", height, ", ",
              width, ")");
  TORCH_CHECK(padding >= 0, "padding must be non-negative, got ", padding);
  // An empty mask has nothing to sample from: only an empty output may come of it.
  TORCH_CHECK(masks.size(2) > 0 || masks.size(0) == 0 || masks.size(1) == 0,
              "masks must have a positive size M");
}

}  // namespace paste_masks
}  // namespace maskops
