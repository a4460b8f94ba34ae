// Mask paste on CUDA: launch logic only. One thread per output pixel (PasteElement in
// paste_masks.h, which the CPU tests also run): a single coalesced pass writes the zeros
// and the pasted values, with no padded or resized intermediates.
#include <optional>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch_cuda.cuh"
#include "paste_masks/paste_masks.h"

namespace maskops {
namespace paste_masks {
namespace {

template <typename scalar_t, typename T, typename box_t, typename out_t>
void launch(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
            double threshold, bool thresholded) {
  const auto p = make_params<box_t>(masks.size(0), masks.size(1), masks.size(2), padding,
                                    out.size(2), out.size(3), threshold);
  PasteElement<scalar_t, T, box_t, out_t> f{p, masks.data_ptr<scalar_t>(), boxes.data_ptr<box_t>(),
                                            out.data_ptr<out_t>(), thresholded};
  cuda_for_each(out.numel(), f);
}

at::Tensor paste_masks_cuda(const at::Tensor& masks, const at::Tensor& boxes, int64_t height,
                            int64_t width, int64_t padding, std::optional<double> threshold,
                            bool as_uint8) {
  check_floating(masks, "masks");
  check_dim(masks, 4, "masks");
  TORCH_CHECK(masks.size(2) == masks.size(3), "masks must be square ([N, C, M, M]), got ",
              masks.sizes());
  check_floating(boxes, "boxes");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == masks.size(0),
              "boxes must have shape [N, 4] with one row per mask, got ", boxes.sizes());
  check_same_device(masks, boxes, "masks", "boxes");
  TORCH_CHECK(height >= 0 && width >= 0 && padding >= 0,
              "image_size and padding must be non-negative");
  c10::cuda::CUDAGuard guard(masks.device());
  const bool thresholded = threshold.has_value();
  const at::ScalarType ot = !thresholded ? masks.scalar_type() : (as_uint8 ? at::kByte : at::kBool);
  at::Tensor out = at::empty({masks.size(0), masks.size(1), height, width}, masks.options().dtype(ot));
  if (out.numel() == 0) return out;
  const at::Tensor m = masks.contiguous();
  const at::Tensor b =
      boxes.to(boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const double thr = threshold.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "paste_masks_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    using mask_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "paste_masks_cuda_boxes", [&] {
      using box_t = scalar_t;
      if (!thresholded) {
        launch<mask_t, T, box_t, mask_t>(m, b, out, padding, thr, false);
      } else if (as_uint8) {
        launch<mask_t, T, box_t, uint8_t>(m, b, out, padding, thr, true);
      } else {
        launch<mask_t, T, box_t, bool>(m, b, out, padding, thr, true);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) {
  m.impl("paste_masks", &paste_masks_cuda);
}

}  // namespace paste_masks
}  // namespace maskops
