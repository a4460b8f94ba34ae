// The RPN proposal step on the CPU, per batch:
//   1. per level and image, the top-k logits: a sampled threshold, one filtering pass and a
//      sort of the few survivors; where the result is not unique (equal logits among the top
//      k or at its edge, or a NaN), torch.topk on the same slice, as torchvision calls it;
//   2. scores: at::sigmoid on the gathered [B, K] logits: the same call on the same shape as
//      torchvision's (torch's vectorised sigmoid rounds a tensor's last few elements by a
//      scalar path, so position matters for bit-exact scores);
//   3. decode, clip and filter every candidate in two passes around at::exp_ (rpn.h), chunk by
//      chunk;
//   4. per image: the kept candidates compacted, then maskops::batched_nms by level with
//      max_output = post_nms_top_n, which stops as soon as that many boxes are kept.
// The test-only op _rpn_proposals_elementwise runs the CUDA algorithm (rpn_host.h) instead.
#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sigmoid.h>
#include <torch/library.h>

// No fused multiply-adds: every operation rounds separately, as torch's do.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "common/cpu_chunks.h"
#include "common/host_device.h"
#include "rpn/rpn.h"
#include "rpn/rpn_host.h"

namespace maskops {
namespace rpn {
namespace {

// Candidates per chunk of the two passes around at::exp_, and per task: a few thousand per
// image are a fraction of a millisecond of work, not worth waking a second thread for (on a
// busy machine a parallel region can wait a whole time slice for it).
constexpr int64_t kChunk = 8192;
constexpr int64_t kChunksPerTask = 8;
constexpr int64_t kGrain = kChunk * kChunksPerTask;

// The indices of the k largest of v[0, n), by decreasing value, into out; returns false when
// that is not unique (a NaN, or two equal values among the k largest or at the k-th place),
// the cases where only torch.topk itself defines the result. The k largest are found among the
// values at or above a threshold taken from a strided sample, low enough that they nearly
// always include k values (if not, every value is a candidate).
template <typename T>
bool top_k_unique(const T* v, int64_t n, int64_t k, int64_t* out) {
  if (k == 0) return true;
  constexpr int64_t kSample = 4096;
  T threshold = -std::numeric_limits<T>::infinity();
  if (n >= 8 * kSample && 16 * k <= n) {
    std::vector<T> sample(kSample);
    const int64_t step = n / kSample;
    for (int64_t j = 0; j < kSample; ++j) sample[j] = v[j * step];
    // The k largest of n are about the k * kSample / n largest of the sample: take a rank
    // half as large again plus 32 (several standard deviations of the sample's spread).
    const int64_t r = k * kSample / n;
    const int64_t rank = r + r / 2 + 32;
    if (rank < kSample) {
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(),
                       [](T a, T b) { return a > b; });
      threshold = sample[rank];
    }
  }
  std::vector<std::pair<T, int64_t>> cand;
  for (int pass = 0; pass < 2; ++pass) {
    cand.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (!(v[i] < threshold)) cand.emplace_back(v[i], i);  // NaN included: checked below
    }
    if (static_cast<int64_t>(cand.size()) >= k) break;
    threshold = -std::numeric_limits<T>::infinity();
  }
  for (const auto& c : cand) {
    if (c.first != c.first) return false;
  }
  auto desc = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return a.first > b.first;
  };
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), desc);
  const T kth = cand[k - 1].first;
  for (size_t j = k; j < cand.size(); ++j) {
    if (cand[j].first == kth) return false;  // a tie at the k-th place
  }
  std::sort(cand.begin(), cand.begin() + k, desc);
  for (int64_t j = 0; j < k; ++j) {
    if (j > 0 && cand[j].first == cand[j - 1].first) return false;  // their order is torch's
    out[j] = cand[j].second;
  }
  return true;
}

// rpn_host.h's top_n, faster: top_k_unique per image and level, torch.topk where that gives
// up (on that one image and level: rows are independent, so the result is the same).
TopN top_n_cpu(const at::Tensor& objectness, at::IntArrayRef num_anchors_per_level,
               int64_t pre_nms_top_n) {
  const at::ScalarType st = objectness.scalar_type();
  if (st != at::kFloat && st != at::kDouble) {
    return top_n(objectness, num_anchors_per_level, pre_nms_top_n);
  }
  const int64_t B = objectness.size(0);
  TopN t;
  std::vector<int64_t> ks;
  for (size_t l = 0; l < num_anchors_per_level.size(); ++l) {
    ks.push_back(std::min(pre_nms_top_n, num_anchors_per_level[l]));
    t.level_of.insert(t.level_of.end(), ks.back(), static_cast<int64_t>(l));
  }
  const int64_t K = static_cast<int64_t>(t.level_of.size());
  t.index = at::empty({B, K}, objectness.options().dtype(at::kLong));
  int64_t* ip = t.index.data_ptr<int64_t>();
  const at::Tensor obj = objectness.contiguous();
  AT_DISPATCH_FLOATING_TYPES(st, "rpn_top_n_cpu", [&] {
    const scalar_t* op = obj.data_ptr<scalar_t>();
    const int64_t A = obj.size(1);
    for (int64_t b = 0; b < B; ++b) {
      int64_t offset = 0, pos = 0;
      for (size_t l = 0; l < ks.size(); ++l) {
        const int64_t n = num_anchors_per_level[l], k = ks[l];
        int64_t* dst = ip + b * K + pos;
        if (!top_k_unique(op + b * A + offset, n, k, dst)) {
          const at::Tensor idx = std::get<1>(at::topk(obj.select(0, b).narrow(0, offset, n), k, 0,
                                                      /*largest=*/true, /*sorted=*/true));
          std::copy(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + k, dst);
        }
        for (int64_t j = 0; j < k; ++j) dst[j] += offset;
        offset += n;
        pos += k;
      }
    }
  });
  return t;
}

Proposals rpn_proposals_cpu(const at::Tensor& objectness, const at::Tensor& deltas,
                            const at::Tensor& anchors, at::IntArrayRef image_sizes,
                            int64_t pre_nms_top_n, int64_t post_nms_top_n, double nms_thresh,
                            double score_thresh, double min_size,
                            at::IntArrayRef num_anchors_per_level) {
  check_args(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n,
             nms_thresh, score_thresh, min_size, num_anchors_per_level);
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
    cpu_for_each_chunk(n, kChunk, kChunksPerTask, [&](int64_t lo, int64_t hi) {
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
      const at::Tensor kept =
          batched_nms(ib, is, il, nms_thresh, std::nullopt, post_nms_top_n);
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
  check_args(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n,
             nms_thresh, score_thresh, min_size, num_anchors_per_level);
  return proposals_gpu_algo(objectness, deltas, anchors, image_sizes, pre_nms_top_n,
                            post_nms_top_n, nms_thresh, score_thresh, min_size,
                            num_anchors_per_level, CpuLaunch{}, nms_bitmask);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("rpn_proposals", &rpn_proposals_cpu);
  m.impl("_rpn_proposals_elementwise", &rpn_proposals_elementwise_cpu);
}

}  // namespace rpn
}  // namespace maskops
