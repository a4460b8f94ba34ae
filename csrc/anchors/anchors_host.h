// The level table of generate_anchors, built on the host by the CPU and CUDA wrappers from
// arguments check_args() (anchors_args.h) has accepted (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "anchors/anchors.h"

namespace maskops {
namespace anchors {

// The level table, an int64 CPU tensor [L, kLevelFields]. Sets *total to the number of
// anchors and *cells to the number of feature cells.
inline at::Tensor level_table(at::IntArrayRef sizes_per_level, at::IntArrayRef ratios_per_level,
                              at::IntArrayRef grid_sizes, at::IntArrayRef strides, int64_t* total,
                              int64_t* cells) {
  const int64_t L = static_cast<int64_t>(sizes_per_level.size());
  at::Tensor table = at::empty({L, kLevelFields}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t first = 0, first_cell = 0, size_off = 0, ratio_off = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
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
  *total = first;
  *cells = first_cell;
  return table;
}

}  // namespace anchors
}  // namespace maskops
