// The RPN proposal step on the CPU, per batch:
//   1. per level and image, the top-k logits (rpn_topk.h: torch.topk's result, faster);
//   2. scores: at::sigmoid on the gathered [B, K] logits: the same call on the same shape as
//      torchvision's (torch's vectorised sigmoid rounds a tensor's last few elements by a
//      scalar path, so position matters for bit-exact scores);
//   3. decode, clip and filter every candidate in two passes around at::exp_ (rpn.h), chunk by
//      chunk;
//   4. per image: the kept candidates compacted, then maskops::batched_nms by level with
//      max_output = post_nms_top_n, which stops as soon as that many boxes are kept.
// The test-only op _rpn_proposals_elementwise runs the CUDA algorithm (rpn_host.h) instead.
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sigmoid.h>
#include <torch/library.h>

// From here on no fused multiply-adds: the op's math rounds as torch's (see the header).
#include "common/no_fp_contract.h"

#include "common/cpu_chunks.h"
#include "common/host_device.h"
#include "rpn/rpn.h"
#include "rpn/rpn_args.h"
#include "rpn/rpn_host.h"
#include "rpn/rpn_topk.h"

namespace maskops {
namespace rpn {
namespace {

// The two passes around at::exp_ (common/cpu_chunks.h): a few thousand candidates per image
// are a fraction of a millisecond of work, so they run on the calling thread (on a busy
// machine a parallel region can wait a whole time slice for its threads); a second thread from
// 2^16 candidates on.
constexpr int64_t kChunk = 8192;
constexpr int64_t kGrain = int64_t(1) << 16;

Proposals rpn_proposals_cpu(const at::Tensor& objectness, const at::Tensor& deltas,
                            const at::Tensor& anchors, at::IntArrayRef image_sizes,
                            int64_t pre_nms_top_n, int64_t post_nms_top_n, double nms_thresh,
                            double score_thresh, double min_size,
                            at::IntArrayRef num_anchors_per_level) {
  check_args(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh,
             score_thresh, min_size, num_anchors_per_level);
  const int64_t B = objectness.size(0);
  const TopN sel = top_n_cpu(objectness, num_anchors_per_level, pre_nms_top_n);
  const int64_t K = sel.index.size(1), n = B * K;
  const at::ScalarType mt = math_type(deltas.scalar_type());
  const auto opts = deltas.options().dtype(mt);
  const at::Tensor scores = at::sigmoid(at::gather(objectness, 1, sel.index).to(mt));
  const at::Tensor del = deltas.to(mt).contiguous();
  const at::Tensor anc = anchors.to(mt).contiguous();
  at::Tensor boxes = at::empty({n, 4}, opts);
  at::Tensor keep = at::empty({n}, opts.dtype(at::kBool));
  std::vector<at::Tensor> out_boxes, out_scores;
  AT_DISPATCH_FLOATING_TYPES(mt, "rpn_proposals_cpu", [&] {
    using T = scalar_t;
    const Candidates<T> c = make_candidates<T>(nullptr, del, anc, sel.index, image_sizes.data(),
                                               score_thresh, min_size);
    T* bp = boxes.data_ptr<T>();
    const T* sp = scores.data_ptr<T>();
    const bool* kp = keep.data_ptr<bool>();
    cpu_for_each_chunk(n, kChunk, kGrain, [&](int64_t lo, int64_t hi) {
      at::Tensor buf = at::empty({2 * (hi - lo)}, opts);
      T* e = buf.data_ptr<T>();
      const LogScales<T> pass1{c, e, lo};
      for (int64_t i = lo; i < hi; ++i) pass1(i);
      buf.exp_();
      const Finish<T> pass2{c, e, lo, sp, bp, keep.data_ptr<bool>()};
      for (int64_t i = lo; i < hi; ++i) pass2(i);
    });
    for (int64_t b = 0; b < B; ++b) {
      int64_t count = 0;
      for (int64_t i = b * K; i < (b + 1) * K; ++i) count += kp[i];
      at::Tensor ib = at::empty({count, 4}, opts), is = at::empty({count}, opts),
                 il = at::empty({count}, opts.dtype(at::kLong));
      T* ibp = ib.data_ptr<T>();
      T* isp = is.data_ptr<T>();
      int64_t* ilp = il.data_ptr<int64_t>();
      for (int64_t i = b * K, j = 0; i < (b + 1) * K; ++i) {
        if (!kp[i]) continue;
        for (int c4 = 0; c4 < 4; ++c4) ibp[4 * j + c4] = bp[4 * i + c4];
        isp[j] = sp[i];
        ilp[j] = sel.level_of[i - b * K];
        ++j;
      }
      const at::Tensor kept = batched_nms(ib, is, il, nms_thresh, std::nullopt, post_nms_top_n);
      out_boxes.push_back(ib.index_select(0, kept).to(deltas.scalar_type()));
      out_scores.push_back(is.index_select(0, kept).to(objectness.scalar_type()));
    }
  });
  return {out_boxes, out_scores};
}

struct CpuLaunch {
  template <typename F>
  void operator()(int64_t n, const F& f) const {
    cpu_for_each(n, kGrain, f);
  }
};

// Test-only: the CUDA algorithm, with the CUDA NMS algorithm, on the CPU.
Proposals rpn_proposals_elementwise_cpu(const at::Tensor& objectness, const at::Tensor& deltas,
                                        const at::Tensor& anchors, at::IntArrayRef image_sizes,
                                        int64_t pre_nms_top_n, int64_t post_nms_top_n,
                                        double nms_thresh, double score_thresh, double min_size,
                                        at::IntArrayRef num_anchors_per_level) {
  check_args(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh,
             score_thresh, min_size, num_anchors_per_level);
  return proposals_gpu_algo(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n,
                            nms_thresh, score_thresh, min_size, num_anchors_per_level, CpuLaunch{},
                            [](const auto&... args) { return nms::segmented_nms_cpu(args...); });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) { m.impl("rpn_proposals", &rpn_proposals_cpu); }

TORCH_LIBRARY_IMPL(maskops_testing, CPU, m) {
  m.impl("_rpn_proposals_elementwise", &rpn_proposals_elementwise_cpu);
}

}  // namespace rpn
}  // namespace maskops
