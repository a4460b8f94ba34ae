// RoIAlign on CUDA: launch logic only. The per-element bodies (ForwardElement,
// BackwardScatter, BackwardGather) live in roi_align.h and are also run on the CPU by the
// test-only ops, so CPU tests check the arithmetic this file launches.
//
// Forward: one thread per output element, in the output's memory order (consecutive threads
// write consecutive addresses; with channels-last inputs they also read consecutive channels).
// Backward: atomics into a float accumulator by default; with
// torch.use_deterministic_algorithms(True), a gather in fixed order (same bits every run).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch_cuda.cuh"
#include "roi_align/roi_align.h"

namespace maskops {
namespace roi_align {
namespace {

void check_rois(const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w) {
  check_floating(rois, "rois");
  check_dim(rois, 2, "rois");
  TORCH_CHECK(rois.size(1) == 5, "rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "output_size must be positive, got (", pooled_h,
              ", ", pooled_w, ")");
}

at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t sampling_ratio, bool aligned) {
  check_floating(input, "input");
  check_dim(input, 4, "input");
  check_rois(rois, pooled_h, pooled_w);
  check_same_device(input, rois, "input", "rois");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  const auto fmt = output_memory_format(input);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const at::Tensor rois_m = rois.to(math_type(input.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "roi_align_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    ForwardElement<scalar_t, T> f{
        Params<T>{N, C, H, W, pooled_h, pooled_w, K, static_cast<T>(spatial_scale),
                  sampling_ratio, aligned},
        input.data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2),
        input.stride(3), rois_m.data_ptr<T>(), output.data_ptr<scalar_t>(),
        fmt == at::MemoryFormat::ChannelsLast};
    cuda_for_each(output.numel(), f);
  });
  return output;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch_size, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  check_floating(grad, "grad");
  check_dim(grad, 4, "grad");
  check_rois(rois, pooled_h, pooled_w);
  check_same_device(grad, rois, "grad", "rois");
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.size(0) == K && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "grad must have shape [", K, ", ", channels, ", ", pooled_h, ", ", pooled_w,
              "], got ", grad.sizes());
  c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType mt = math_type(grad.scalar_type());
  at::Tensor acc = at::zeros({batch_size, channels, height, width}, grad.options().dtype(mt));
  if (acc.numel() > 0 && K > 0) {
    const at::Tensor rois_m = rois.to(mt).contiguous();
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "roi_align_backward_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      const Params<T> p{batch_size, channels, height, width, pooled_h, pooled_w, K,
                        static_cast<T>(spatial_scale), sampling_ratio, aligned};
      const GradStrides gs{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      if (deterministic) {
        BackwardGather<scalar_t, T> f{p, grad.data_ptr<scalar_t>(), gs, rois_m.data_ptr<T>(),
                                      acc.data_ptr<T>()};
        cuda_for_each(acc.numel(), f);
      } else {
        BackwardScatter<scalar_t, T> f{p, grad.data_ptr<scalar_t>(), gs, rois_m.data_ptr<T>(),
                                       acc.data_ptr<T>()};
        cuda_for_each(grad.numel(), f);
      }
    });
  }
  return acc.to(grad.scalar_type()).contiguous(output_memory_format(grad));
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace roi_align
}  // namespace maskops
