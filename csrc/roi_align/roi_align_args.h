// Argument checks of the RoIAlign ops, shared by roi_align_cpu.cpp and roi_align_cuda.cu
// (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "roi_align/roi_align.h"

namespace maskops {
namespace roi_align {

inline void check_rois(const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w) {
  check_floating(rois, "rois");
  check_dim(rois, 2, "rois");
  TORCH_CHECK(rois.size(1) == 5, "rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got ",
              rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "output_size must be positive, got (", pooled_h, ", ",
              pooled_w, ")");
}

// The single-level op's feature map, which it names "input".
inline void check_input(const at::Tensor& input) {
  check_floating(input, "input");
  check_dim(input, 4, "input");
}

inline void check_features(at::TensorList features, const at::Tensor& rois,
                           at::ArrayRef<double> scales) {
  TORCH_CHECK(!features.empty() && features.size() <= static_cast<size_t>(kMaxLevels),
              "features must hold 1 to ", kMaxLevels, " levels, got ", features.size());
  TORCH_CHECK(scales.size() == features.size(), "spatial_scales must have one entry per level (",
              features.size(), "), got ", scales.size());
  const at::Tensor& f0 = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    check_floating(f, "features");
    check_dim(f, 4, "features");
    TORCH_CHECK(f.scalar_type() == f0.scalar_type() && f.device() == f0.device() &&
                    f.size(0) == f0.size(0) && f.size(1) == f0.size(1),
                "every level must share dtype, device, batch size and channels with level 0; "
                "level ",
                l, " is ", f.scalar_type(), " ", f.sizes(), " on ", f.device());
    TORCH_CHECK(scales[l] > 0, "spatial_scales[", l, "] must be positive, got ", scales[l]);
  }
  check_same_device(f0, rois, "features", "rois");
}

inline void check_sampling_ratio(int64_t sampling_ratio) {
  TORCH_CHECK(sampling_ratio <= kMaxSamplingRatio, "sampling_ratio must be at most ",
              kMaxSamplingRatio,
              " (sample points per bin along each axis; <= 0 picks them per "
              "box), got ",
              sampling_ratio);
}

// Checks the backward arguments shared by the CPU and CUDA backward kernels.
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                at::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w,
                                int64_t batch_size, int64_t channels, at::IntArrayRef heights,
                                at::IntArrayRef widths) {
  check_floating(grad, "grad");
  check_dim(grad, 4, "grad");
  check_rois(rois, pooled_h, pooled_w);
  check_same_device(grad, rois, "grad", "rois");
  const size_t L = scales.size();
  TORCH_CHECK(
      L >= 1 && L <= static_cast<size_t>(kMaxLevels) && heights.size() == L && widths.size() == L,
      "spatial_scales, heights and widths must have one entry per level (1 to ", kMaxLevels, ")");
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.size(0) == K && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "grad must have shape [", K, ", ", channels, ", ", pooled_h, ", ", pooled_w,
              "], got ", grad.sizes());
  TORCH_CHECK(batch_size >= 0 && channels >= 0, "batch_size and channels must be non-negative");
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, "heights and widths must be non-negative");
  }
}

}  // namespace roi_align
}  // namespace maskops
