// generate_anchors on CUDA: launch logic only. One thread per feature cell (AnchorGrid in
// anchors.h, which the CPU build runs too), every level in one launch. The level table is
// built on the host and copied to the device (a few hundred bytes; the Python front caches
// the anchors, so this runs once per image size).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "anchors/anchors.h"
#include "anchors/anchors_args.h"
#include "anchors/anchors_host.h"
#include "common/launch_cuda.cuh"

namespace maskops {
namespace anchors {
namespace {

at::Tensor generate_anchors_cuda(const at::Tensor& sizes, const at::Tensor& aspect_ratios,
                                 at::IntArrayRef sizes_per_level, at::IntArrayRef ratios_per_level,
                                 at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                 at::ScalarType dtype) {
  check_args(sizes, aspect_ratios, sizes_per_level, ratios_per_level, grid_sizes, strides, dtype);
  int64_t total = 0, cells = 0;
  const at::Tensor table =
      level_table(sizes_per_level, ratios_per_level, grid_sizes, strides, &total, &cells);
  c10::cuda::CUDAGuard guard(sizes.device());
  at::Tensor out = at::empty({total, 4}, sizes.options().dtype(dtype));
  if (total == 0) return out;
  // From pinned memory without waiting (a pageable copy would block the host).
  const at::Tensor dtable = table.pin_memory().to(sizes.device(), at::kLong, /*non_blocking=*/true);
  const at::Tensor s = sizes.to(at::kFloat).contiguous();
  const at::Tensor r = aspect_ratios.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "generate_anchors_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    cuda_for_each(cells, AnchorGrid<scalar_t, T>{dtable.data_ptr<int64_t>(), dtable.size(0),
                                                 s.data_ptr<float>(), r.data_ptr<float>(),
                                                 out.data_ptr<scalar_t>()});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) { m.impl("generate_anchors", &generate_anchors_cuda); }

}  // namespace anchors
}  // namespace maskops
