// NMS's GPU algorithm, host side, written once for the CUDA wrapper (nms_cuda.cu) and its CPU
// twin, the test-only op _nms_bitmask (nms_cpu.cpp): a stable descending sort of the scores,
// the boxes (class ids, scores) gathered in score order, the mask (MaskBlock), where the walk
// keeps its removed bits (place_removed()), the gather (GatherKept's walk()) and the one host
// read of the kept count. `launch` supplies the backend's part:
//   launch.check(n)                                 the backend's size limits;
//   launch.mask(f)                                  every tile of MaskBlock<T> f;
//   launch.gather(g, placement, removed_global, count)
//                                                   the walk, writing its count to *count.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/util/Optional.h>

#include "nms/nms.h"
#include "nms/nms_args.h"

namespace maskops {
namespace nms {

template <typename Launch>
at::Tensor nms_gpu_algo(const at::Tensor& boxes, const at::Tensor& scores,
                        const c10::optional<at::Tensor>& idxs, double iou_threshold,
                        c10::optional<double> score_threshold, c10::optional<int64_t> max_output,
                        int64_t shared_words, const Launch& launch) {
  check_nms_args(boxes, scores, idxs, iou_threshold, score_threshold, max_output);
  const int64_t n = boxes.size(0);
  const auto long_opts = boxes.options().dtype(at::kLong);
  if (n == 0 || max_output.value_or(1) == 0) return at::empty({0}, long_opts);
  launch.check(n);
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  // Stable and descending, like the CPU: equal scores by index, NaN scores first.
  auto sorted = at::sort(scores.contiguous(), /*stable=*/true, /*dim=*/0, /*descending=*/true);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor sboxes =
      boxes.index_select(0, order).to(math_type(boxes.scalar_type())).contiguous();
  at::Tensor sclasses, sscores;
  if (idxs.has_value()) sclasses = idxs->index_select(0, order).to(at::kLong).contiguous();
  if (score_threshold.has_value()) sscores = std::get<0>(sorted).to(at::kDouble).contiguous();

  at::Tensor mask = at::empty({n * col_blocks}, long_opts);
  uint64_t* mp = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(sboxes.scalar_type(), "nms_mask", [&] {
    launch.mask(MaskBlock<scalar_t>{sboxes.data_ptr<scalar_t>(),
                                    sclasses.defined() ? sclasses.data_ptr<int64_t>() : nullptr, n,
                                    col_blocks, threshold_in<scalar_t>(iou_threshold), mp});
  });

  // out[0, n): kept indices; out[n]: how many.
  at::Tensor out = at::empty({n + 1}, long_opts);
  const GatherKept g{mp,
                     n,
                     col_blocks,
                     order.data_ptr<int64_t>(),
                     sscores.defined() ? sscores.data_ptr<double>() : nullptr,
                     score_threshold.value_or(0.0),
                     max_output.value_or(-1),
                     out.data_ptr<int64_t>()};
  const RemovedPlacement rp = place_removed(col_blocks, 1, shared_words);
  at::Tensor removed_global;
  if (rp.global_words > 0) removed_global = at::empty({rp.global_words}, long_opts);
  launch.gather(g, rp,
                removed_global.defined()
                    ? reinterpret_cast<uint64_t*>(removed_global.data_ptr<int64_t>())
                    : nullptr,
                out.data_ptr<int64_t>() + n);
  // The one host synchronisation (documented): the output's length is data-dependent.
  const int64_t count = out.select(0, n).item<int64_t>();
  return out.narrow(0, 0, count);
}

}  // namespace nms
}  // namespace maskops
