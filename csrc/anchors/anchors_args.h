// Argument checks of generate_anchors, shared by the CPU and CUDA wrappers (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace maskops {
namespace anchors {

inline void check_list(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 1, name,
              " must be a 1-d tensor (every level's values, one level after "
              "another), got shape ",
              t.sizes());
}

inline void check_args(const at::Tensor& sizes, const at::Tensor& aspect_ratios,
                       at::IntArrayRef sizes_per_level, at::IntArrayRef ratios_per_level,
                       at::IntArrayRef grid_sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating dtype, got ", dtype);
  check_list(sizes, "sizes");
  check_list(aspect_ratios, "aspect_ratios");
  check_same_device(sizes, aspect_ratios, "sizes", "aspect_ratios");
  const int64_t L = static_cast<int64_t>(sizes_per_level.size());
  TORCH_CHECK(static_cast<int64_t>(ratios_per_level.size()) == L,
              "ratios_per_level must have one entry per level (", L, "), got ",
              ratios_per_level.size());
  TORCH_CHECK(static_cast<int64_t>(grid_sizes.size()) == 2 * L,
              "grid_sizes must hold (height, width) for each of the ", L, " levels (", 2 * L,
              " values), got ", grid_sizes.size());
  TORCH_CHECK(static_cast<int64_t>(strides.size()) == 2 * L,
              "strides must hold (stride_h, stride_w) for each of the ", L, " levels (", 2 * L,
              " values), got ", strides.size());
  int64_t size_sum = 0, ratio_sum = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
    TORCH_CHECK(h >= 0 && w >= 0, "grid_sizes must be non-negative, got (", h, ", ", w,
                ") for level ", l);
    TORCH_CHECK(strides[2 * l] >= 0 && strides[2 * l + 1] >= 0,
                "strides must be non-negative, got (", strides[2 * l], ", ", strides[2 * l + 1],
                ") for level ", l);
    TORCH_CHECK(sizes_per_level[l] >= 0 && ratios_per_level[l] >= 0,
                "sizes_per_level and ratios_per_level must be non-negative");
    size_sum += sizes_per_level[l];
    ratio_sum += ratios_per_level[l];
  }
  TORCH_CHECK(sizes.size(0) == size_sum, "sizes must hold sum(sizes_per_level) = ", size_sum,
              " values, got ", sizes.size(0));
  TORCH_CHECK(aspect_ratios.size(0) == ratio_sum,
              "aspect_ratios must hold sum(ratios_per_level) = ", ratio_sum, " values, got ",
              aspect_ratios.size(0));
}

}  // namespace anchors
}  // namespace maskops
