// RoIAlign on CUDA, single- and multi-level: launch logic only. The per-element bodies
// (ForwardElement, BackwardScatter, BackwardGather) live in roi_align.h and are also run on
// the CPU by the test-only ops, so CPU tests check the arithmetic this file launches.
//
// Forward: one thread per output element, in the output's memory order (consecutive threads
// write consecutive addresses; with channels-last inputs they also read consecutive channels),
// all pyramid levels in one launch. Backward (backward_gpu_algo, roi_align_host.h, which the
// CPU test-only op runs too): atomics into the gradients (float accumulators for half types)
// by default; with torch.use_deterministic_algorithms(True), a gather in fixed order (same
// bits every run): one thread per spatial position of the pyramid, all channels
// (backward_gather). Either writes each level in its output layout, channels-last included.
#include <vector>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch_cuda.cuh"
#include "roi_align/roi_align.h"
#include "roi_align/roi_align_args.h"
#include "roi_align/roi_align_host.h"

namespace maskops {
namespace roi_align {
namespace {

at::Tensor pyramid_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                at::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w,
                                int64_t sampling_ratio, bool aligned, double canonical_scale,
                                double canonical_level, int64_t k_min) {
  check_features(features, rois, scales);
  check_rois(rois, pooled_h, pooled_w);
  const at::Tensor& f0 = features[0];
  const std::vector<int64_t> heights = sizes_of(features, 2), widths = sizes_of(features, 3);
  c10::cuda::CUDAGuard guard(f0.device());
  const int64_t K = rois.size(0);
  const auto fmt = output_memory_format(f0);
  at::Tensor output =
      at::empty({K, f0.size(1), pooled_h, pooled_w}, f0.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const at::Tensor rois_m = rois.to(math_type(f0.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        ForwardElement<scalar_t, T> f{};
        f.p = make_params<T>(f0.size(0), f0.size(1), heights, widths, scales, pooled_h, pooled_w, K,
                             sampling_ratio, aligned, canonical_scale, canonical_level, k_min);
        for (size_t l = 0; l < features.size(); ++l) {
          const at::Tensor& x = features[l];
          f.level[l] = {x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
        }
        f.rois = rois_m.data_ptr<T>();
        f.output = output.data_ptr<scalar_t>();
        f.channels_last = fmt == at::MemoryFormat::ChannelsLast;
        cuda_for_each(output.numel(), f);
      });
  return output;
}

std::vector<at::Tensor> pyramid_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                              at::ArrayRef<double> scales, int64_t pooled_h,
                                              int64_t pooled_w, int64_t batch_size,
                                              int64_t channels, at::IntArrayRef heights,
                                              at::IntArrayRef widths, int64_t sampling_ratio,
                                              bool aligned, double canonical_scale,
                                              double canonical_level, int64_t k_min) {
  c10::cuda::CUDAGuard guard(grad.device());
  const auto launch = [](int64_t n, const auto& f) { cuda_for_each(n, f); };
  return backward_gpu_algo(grad, rois, scales, pooled_h, pooled_w, batch_size, channels, heights,
                           widths, sampling_ratio, aligned, canonical_scale, canonical_level, k_min,
                           at::globalContext().deterministicAlgorithms(), launch, launch);
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t sampling_ratio, bool aligned) {
  check_input(input);
  return pyramid_forward_cuda({input}, rois, {spatial_scale}, pooled_h, pooled_w, sampling_ratio,
                              aligned, 224.0, 4.0, 0);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch_size, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  return pyramid_backward_cuda(grad, rois, {spatial_scale}, pooled_h, pooled_w, batch_size,
                               channels, {height}, {width}, sampling_ratio, aligned, 224.0, 4.0,
                               0)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
  m.impl("multiscale_roi_align", &pyramid_forward_cuda);
  m.impl("_multiscale_roi_align_backward", &pyramid_backward_cuda);
}

}  // namespace roi_align
}  // namespace maskops
