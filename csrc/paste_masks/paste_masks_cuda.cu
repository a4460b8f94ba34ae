// Mask paste on CUDA: launch logic only. One block of kPasteThreads per tile of kTilePixels
// pixels of one (mask, channel) plane, running paste_tile() (paste_masks.h, which the CPU
// test op runs too): the block's box geometry is computed once, into shared memory, and a
// single coalesced pass writes the zeros and the pasted values, with no padded or resized
// intermediates. 32-bit indices unless the output or the masks hold 2^31 elements or more.
#include <optional>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "paste_masks/paste_masks.h"
#include "paste_masks/paste_masks_args.h"

namespace maskops {
namespace paste_masks {
namespace {

struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};

template <typename F, typename index_t, typename T>
__global__ void __launch_bounds__(kPasteThreads) paste_kernel(F f) {
  __shared__ PlaneGeometry<index_t, T> g;
  const index_t t = static_cast<index_t>(threadIdx.x);
  paste_tile(f, static_cast<index_t>(blockIdx.x), t, t + 1, static_cast<index_t>(blockDim.x), g,
             BlockSync{});
}

template <typename index_t, typename scalar_t, typename T, typename box_t, typename out_t>
void launch_tiles(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out,
                  const Params<box_t>& p, bool thresholded) {
  const int64_t tiles = tiles_per_plane(p.height, p.width);
  const int64_t blocks = p.num_masks * p.channels * tiles;
  TORCH_CHECK(blocks <= INT32_MAX, "paste_masks: output too large (", out.numel(), " elements)");
  using F = PasteTiles<index_t, scalar_t, T, box_t, out_t>;
  const F f{p,
            masks.data_ptr<scalar_t>(),
            boxes.data_ptr<box_t>(),
            out.data_ptr<out_t>(),
            static_cast<index_t>(tiles),
            thresholded};
  paste_kernel<F, index_t, T>
      <<<static_cast<unsigned>(blocks), kPasteThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename T, typename box_t, typename out_t>
void launch(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
            double threshold, bool thresholded) {
  const auto p = make_params<box_t>(masks.size(0), masks.size(1), masks.size(2), padding,
                                    out.size(2), out.size(3), threshold);
  if (fits_int32(out.numel(), masks.numel())) {
    launch_tiles<int32_t, scalar_t, T, box_t, out_t>(masks, boxes, out, p, thresholded);
  } else {
    launch_tiles<int64_t, scalar_t, T, box_t, out_t>(masks, boxes, out, p, thresholded);
  }
}

at::Tensor paste_masks_cuda(const at::Tensor& masks, const at::Tensor& boxes, int64_t height,
                            int64_t width, int64_t padding, std::optional<double> threshold,
                            bool as_uint8) {
  check_args(masks, boxes, height, width, padding);
  c10::cuda::CUDAGuard guard(masks.device());
  const bool thresholded = threshold.has_value();
  const at::ScalarType ot = !thresholded ? masks.scalar_type() : (as_uint8 ? at::kByte : at::kBool);
  at::Tensor out =
      at::empty({masks.size(0), masks.size(1), height, width}, masks.options().dtype(ot));
  if (out.numel() == 0) return out;
  const at::Tensor m = masks.contiguous();
  const at::Tensor b = boxes.to(math_type(boxes.scalar_type())).contiguous();
  const double thr = threshold.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, m.scalar_type(), "paste_masks_cuda", [&] {
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

TORCH_LIBRARY_IMPL(maskops, CUDA, m) { m.impl("paste_masks", &paste_masks_cuda); }

}  // namespace paste_masks
}  // namespace maskops
