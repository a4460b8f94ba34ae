// The RPN proposal step on CUDA: the GPU algorithm of rpn_host.h (per-level torch.topk, one
// Candidate pass over every candidate of the batch, a per-image sort by score, one segmented
// NMS with a segment per image, nms_cuda.cu), launched here. The CPU test-only op
// _rpn_proposals_elementwise runs the same algorithm and functor.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/launch_cuda.cuh"
#include "rpn/rpn.h"
#include "rpn/rpn_args.h"
#include "rpn/rpn_host.h"

namespace maskops {
namespace rpn {
namespace {

struct CudaLaunch {
  template <typename F>
  void operator()(int64_t n, const F& f) const {
    cuda_for_each(n, f);
  }
};

Proposals rpn_proposals_cuda(const at::Tensor& objectness, const at::Tensor& deltas,
                             const at::Tensor& anchors, at::IntArrayRef image_sizes,
                             int64_t pre_nms_top_n, int64_t post_nms_top_n, double nms_thresh,
                             double score_thresh, double min_size,
                             at::IntArrayRef num_anchors_per_level) {
  check_args(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh,
             score_thresh, min_size, num_anchors_per_level);
  c10::cuda::CUDAGuard guard(objectness.device());
  return proposals_gpu_algo(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n,
                            nms_thresh, score_thresh, min_size, num_anchors_per_level, CudaLaunch{},
                            nms::segmented_nms_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) { m.impl("rpn_proposals", &rpn_proposals_cuda); }

}  // namespace rpn
}  // namespace maskops
