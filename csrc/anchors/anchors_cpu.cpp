// generate_anchors on the CPU: the AnchorGrid functor (anchors.h) over every feature cell of
// every level in one loop. The CUDA file launches the same functor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "anchors/anchors.h"
#include "anchors/anchors_args.h"
#include "anchors/anchors_host.h"
#include "common/host_device.h"

namespace maskops {
namespace anchors {
namespace {

at::Tensor generate_anchors_cpu(const at::Tensor& sizes, const at::Tensor& aspect_ratios,
                                at::IntArrayRef sizes_per_level, at::IntArrayRef ratios_per_level,
                                at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                at::ScalarType dtype) {
  check_args(sizes, aspect_ratios, sizes_per_level, ratios_per_level, grid_sizes, strides, dtype);
  int64_t total = 0, cells = 0;
  const at::Tensor table =
      level_table(sizes_per_level, ratios_per_level, grid_sizes, strides, &total, &cells);
  at::Tensor out = at::empty({total, 4}, sizes.options().dtype(dtype));
  if (total == 0) return out;
  // torchvision computes cell anchors in float32 whatever the output dtype.
  const at::Tensor s = sizes.to(at::kFloat).contiguous();
  const at::Tensor r = aspect_ratios.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "generate_anchors_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    // A few ns per anchor: a second thread only for 2^17 cells (2 ms) or more.
    cpu_for_each(
        cells, int64_t(1) << 17,
        AnchorGrid<scalar_t, T>{table.data_ptr<int64_t>(), table.size(0), s.data_ptr<float>(),
                                r.data_ptr<float>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) { m.impl("generate_anchors", &generate_anchors_cpu); }

}  // namespace anchors
}  // namespace maskops
