// The RPN's per-level top-k on the CPU (rpn_topk.h). Its own file: it sorts with
// std::sort, which must inline its comparisons, and the files with box arithmetic compile
// with floating-point contraction off, which stops GCC from inlining across that boundary.
#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>

#include "rpn/rpn_topk.h"

namespace maskops {
namespace rpn {
namespace {

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
  if (2 * k <= n) {  // a threshold pays off when it rejects at least half the values
    const int64_t m = std::min(kSample, n);
    std::vector<T> sample(m);
    const int64_t step = n / m;
    for (int64_t j = 0; j < m; ++j) sample[j] = v[j * step];
    // The k largest of n are about the k * m / n largest of the sample: take a rank half as
    // large again plus 32 (several standard deviations of the sample's spread).
    const int64_t r = k * m / n;
    const int64_t rank = r + r / 2 + 32;
    if (rank < m) {
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

}  // namespace

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

}  // namespace rpn
}  // namespace maskops
