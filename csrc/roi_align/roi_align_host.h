// The RoIAlign ops' host side, shared by roi_align_cpu.cpp and roi_align_cuda.cu: the kernel
// parameters, and the CUDA backward's algorithm (backward_gpu_algo), written once over a
// launcher so that its CPU twin, a test-only op, runs it too (host code only).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>

#include "common/checks.h"
#include "roi_align/roi_align.h"
#include "roi_align/roi_align_args.h"

namespace maskops {
namespace roi_align {

template <typename T>
Params<T> make_params(int64_t N, int64_t C, at::IntArrayRef heights, at::IntArrayRef widths,
                      at::ArrayRef<double> scales, int64_t PH, int64_t PW, int64_t K,
                      int64_t sampling_ratio, bool aligned, double canonical_scale,
                      double canonical_level, int64_t k_min) {
  // Every kernel (forward, backward, CPU, CUDA, test-only) builds its parameters here.
  check_sampling_ratio(sampling_ratio);
  Params<T> p{};
  p.num_levels = static_cast<int>(scales.size());
  for (int l = 0; l < p.num_levels; ++l) {
    p.height[l] = heights[l];
    p.width[l] = widths[l];
    p.spatial_scale[l] = static_cast<T>(scales[l]);
  }
  p.level_of = LevelMap<T>{p.num_levels, static_cast<int>(k_min), static_cast<T>(canonical_scale),
                           static_cast<T>(canonical_level)};
  p.batch_size = N;
  p.channels = C;
  p.pooled_h = PH;
  p.pooled_w = PW;
  p.num_rois = K;
  p.sampling_ratio = sampling_ratio;
  p.aligned = aligned;
  return p;
}

inline std::vector<int64_t> sizes_of(at::TensorList features, int dim) {
  std::vector<int64_t> out;
  for (const auto& f : features) out.push_back(f.size(dim));
  return out;
}

// The scatter backward functor accumulating into levels[l], one [N, C, H, W] accumulator
// (any strides) per level.
template <template <typename, typename> class Body, typename scalar_t, typename T>
Body<scalar_t, T> backward_functor(const Params<T>& p, const at::Tensor& grad,
                                   const at::Tensor& rois_m,
                                   const std::vector<LevelData<T>>& levels) {
  Body<scalar_t, T> f{};
  f.p = p;
  f.grad = grad.data_ptr<scalar_t>();
  f.gs = GradStrides{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  f.rois = rois_m.data_ptr<T>();
  for (int l = 0; l < p.num_levels; ++l) f.grad_input[l] = levels[l];
  return f;
}

// The deterministic backward's RoI groups on the rois' device, without a host sync: RoI
// indices sorted stably by RoiGroupKey, and where each of the num_levels * batch_size groups
// starts (plus the end). `launch(n, functor)` runs a functor over [0, n).
template <typename T, typename Launch>
std::pair<at::Tensor, at::Tensor> group_rois(const Params<T>& p, const at::Tensor& rois_m,
                                             Launch launch) {
  const int64_t K = rois_m.size(0), groups = p.num_levels * p.batch_size;
  at::Tensor key = at::empty({K}, rois_m.options().dtype(at::kLong));
  if (K > 0) launch(K, RoiGroupKey<T>{p, rois_m.data_ptr<T>(), key.data_ptr<int64_t>()});
  const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor starts = at::searchsorted(std::get<0>(sorted), at::arange(groups + 1, key.options()));
  return {std::get<1>(sorted), starts};
}

// The deterministic backward, all of it: the passes before the gather (RoiGeometry, the groups,
// TileRoiMask) and the gather itself, writing every element of the levels' [N, C, H, W]
// accumulators levels[l] (any strides). backward_gpu_algo() runs it, on the CPU (test-only op)
// and on CUDA, each with its own launcher; no host sync (the workspaces' sizes follow from the
// arguments' shapes).
template <typename scalar_t, typename T, typename Launch>
void backward_gather(const Params<T>& p, const at::Tensor& grad, const at::Tensor& rois_m,
                     const std::vector<LevelData<T>>& levels, Launch launch) {
  const int64_t K = rois_m.size(0), L = p.num_levels, N = p.batch_size;
  const auto bytes = rois_m.options().dtype(at::kByte);
  at::Tensor geom = at::empty({K * static_cast<int64_t>(sizeof(RoiGeom<T>))}, bytes);
  at::Tensor spans = at::empty({K, p.pooled_h + p.pooled_w, 2}, rois_m.options().dtype(at::kInt));
  RoiGeom<T>* gp = reinterpret_cast<RoiGeom<T>*>(geom.data_ptr<uint8_t>());
  if (K > 0) launch(K, RoiGeometry<T>{p, rois_m.data_ptr<T>(), gp, spans.data_ptr<int32_t>()});
  const std::pair<at::Tensor, at::Tensor> groups = group_rois(p, rois_m, launch);

  TileLayout t{};
  t.num_levels = p.num_levels;
  t.batch_size = N;
  t.words_per_tile = (K + 63) / 64;
  int64_t longest = 1;
  for (int64_t l = 0; l < L; ++l) longest = std::max({longest, p.height[l], p.width[l]});
  for (t.side = kTile;; t.side *= 2) {
    for (int64_t l = 0; l < L; ++l) {
      t.tiles_h[l] = (p.height[l] + t.side - 1) / t.side;
      t.tiles_w[l] = (p.width[l] + t.side - 1) / t.side;
      t.tile_offset[l + 1] = t.tile_offset[l] + N * t.tiles_h[l] * t.tiles_w[l];
      t.position_offset[l + 1] = t.position_offset[l] + N * p.height[l] * p.width[l];
    }
    if (t.tile_offset[L] * t.words_per_tile <= kMaxTileWords || t.side >= longest) break;
  }
  const int64_t words = t.tile_offset[L] * t.words_per_tile;
  at::Tensor mask = at::empty({words}, rois_m.options().dtype(at::kLong));
  uint64_t* mp = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t* order = groups.first.data_ptr<int64_t>();
  const int64_t* starts = groups.second.data_ptr<int64_t>();
  launch(words, TileRoiMask<T>{t, gp, order, starts, mp});

  BackwardGather<scalar_t, T> f{};
  f.p = p;
  f.grad = grad.data_ptr<scalar_t>();
  f.gs = GradStrides{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  for (int l = 0; l < p.num_levels; ++l) f.grad_input[l] = levels[l];
  f.t = t;
  f.geom = gp;
  f.spans = spans.data_ptr<int32_t>();
  f.roi_order = order;
  f.group_start = starts;
  f.tile_mask = mp;
  launch(t.position_offset[L], f);
}

// The CUDA backward's host side, all levels, written once for the CUDA wrapper and its CPU
// twin (the test-only op _multiscale_roi_align_backward_cuda_algo): `launch(n, functor)` runs
// the deterministic passes, `scatter(n, functor)` the scatter (atomics on the GPU, serial on
// the host). Each level's gradient is its own tensor (levels never alias), in grad's dtype and
// the layout output_memory_format(grad) picks. The kernels write it through its strides: in
// float32 and float64 they accumulate straight into it; half types accumulate in a float32
// tensor of the same layout, cast once at the end. Only the scatter's accumulators are zeroed
// (the gather writes every element); no layout copy.
template <typename Launch, typename Scatter>
std::vector<at::Tensor> backward_gpu_algo(const at::Tensor& grad, const at::Tensor& rois,
                                          at::ArrayRef<double> scales, int64_t pooled_h,
                                          int64_t pooled_w, int64_t batch_size, int64_t channels,
                                          at::IntArrayRef heights, at::IntArrayRef widths,
                                          int64_t sampling_ratio, bool aligned,
                                          double canonical_scale, double canonical_level,
                                          int64_t k_min, bool deterministic, const Launch& launch,
                                          const Scatter& scatter) {
  check_backward_args(grad, rois, scales, pooled_h, pooled_w, batch_size, channels, heights,
                      widths);
  const int L = static_cast<int>(scales.size());
  const int64_t K = rois.size(0);
  const at::ScalarType dt = grad.scalar_type(), mt = math_type(dt);
  const auto fmt = output_memory_format(grad);
  int64_t total = 0;
  for (int l = 0; l < L; ++l) total += batch_size * channels * heights[l] * widths[l];
  const bool work = total > 0 && K > 0;
  std::vector<at::Tensor> out(L), acc(L);
  for (int l = 0; l < L; ++l) {
    const std::vector<int64_t> shape{batch_size, channels, heights[l], widths[l]};
    out[l] = at::empty(shape, grad.options().memory_format(fmt));
    if (!work) {
      out[l].zero_();
      continue;
    }
    acc[l] = mt == dt ? out[l] : at::empty(shape, grad.options().dtype(mt).memory_format(fmt));
    if (!deterministic) acc[l].zero_();
  }
  if (!work) return out;
  const at::Tensor rois_m = rois.to(mt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "roi_align_backward_gpu_algo", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p =
        make_params<T>(batch_size, channels, heights, widths, scales, pooled_h, pooled_w, K,
                       sampling_ratio, aligned, canonical_scale, canonical_level, k_min);
    std::vector<LevelData<T>> levels(L);
    for (int l = 0; l < L; ++l) {
      const at::Tensor& a = acc[l];
      levels[l] = {a.data_ptr<T>(), a.stride(0), a.stride(1), a.stride(2), a.stride(3)};
    }
    if (deterministic) {
      backward_gather<scalar_t>(p, grad, rois_m, levels, launch);
    } else {
      scatter(grad.numel(), backward_functor<BackwardScatter, scalar_t>(p, grad, rois_m, levels));
    }
  });
  if (mt != dt) {
    for (int l = 0; l < L; ++l) out[l].copy_(acc[l]);
  }
  return out;
}

}  // namespace roi_align
}  // namespace maskops
