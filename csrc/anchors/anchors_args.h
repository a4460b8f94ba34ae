// Argument checks and the level table of generate_anchors, shared by the CPU and CUDA
// wrappers (host code only).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "anchors/anchors.h"
#include "common/checks.h"

namespace maskops {
namespace anchors {

inline void check_list(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 1, name, " must be a 1-d tensor (every level's values, one level after "
              "another), got shape ", t.sizes());
}

// Checks the arguments and returns the level table, an int64 CPU tensor [L, kLevelFields].
// Sets *total to the number of anchors and *cells to the number of feature cells.
inline at::Tensor level_table(const at::Tensor& sizes, const at::Tensor& aspect_ratios,
                              at::IntArrayRef sizes_per_level, at::IntArrayRef ratios_per_level,
                              at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                              int64_t* total, int64_t* cells) {
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
  at::Tensor table = at::empty({L, kLevelFields}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t first = 0, first_cell = 0, size_off = 0, ratio_off = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
    TORCH_CHECK(h >= 0 && w >= 0, "grid_sizes must be non-negative, got (", h, ", ", w,
                ") for level ", l);
    TORCH_CHECK(strides[2 * l] >= 0 && strides[2 * l + 1] >= 0,
                "strides must be non-negative, got (", strides[2 * l], ", ", strides[2 * l + 1],
                ") for level ", l);
    TORCH_CHECK(sizes_per_level[l] >= 0 && ratios_per_level[l] >= 0,
                "sizes_per_level and ratios_per_level must be non-negative");
    int64_t* row = t + l * kLevelFields;
    row[kFirstCell] = first_cell;
    row[kFirst] = first;
    row[kHeight] = h;
    row[kWidth] = w;
    row[kStrideH] = strides[2 * l];
    row[kStrideW] = strides[2 * l + 1];
    row[kNumSizes] = sizes_per_level[l];
    row[kNumRatios] = ratios_per_level[l];
    row[kSizeOffset] = size_off;
    row[kRatioOffset] = ratio_off;
    first += h * w * sizes_per_level[l] * ratios_per_level[l];
    // A level without anchors gets no cells, so that every cell has anchors to write.
    first_cell += sizes_per_level[l] * ratios_per_level[l] > 0 ? h * w : 0;
    size_off += sizes_per_level[l];
    ratio_off += ratios_per_level[l];
  }
  TORCH_CHECK(sizes.size(0) == size_off, "sizes must hold sum(sizes_per_level) = ", size_off,
              " values, got ", sizes.size(0));
  TORCH_CHECK(aspect_ratios.size(0) == ratio_off,
              "aspect_ratios must hold sum(ratios_per_level) = ", ratio_off, " values, got ",
              aspect_ratios.size(0));
  *total = first;
  *cells = first_cell;
  return table;
}

inline void check_dtype(at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating dtype, got ", dtype);
}

}  // namespace anchors
}  // namespace maskops
