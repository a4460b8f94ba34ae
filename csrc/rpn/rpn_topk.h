// The RPN's per-level top-k on the CPU (rpn_topk_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "rpn/rpn_host.h"

namespace maskops {
namespace rpn {

// rpn_host.h's top_n, the same result, faster: per image and level, the k largest logits are
// found among those above a threshold taken from a sample, and sorted; where that result is
// not unique (a NaN, or equal values among the k largest or at the k-th place) torch.topk
// runs on that image and level, as in torchvision (rows are independent, so this equals
// torchvision's call on all images at once).
TopN top_n_cpu(const at::Tensor& objectness, at::IntArrayRef num_anchors_per_level,
               int64_t pre_nms_top_n);

}  // namespace rpn
}  // namespace maskops
