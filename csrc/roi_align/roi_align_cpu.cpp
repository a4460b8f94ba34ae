// RoIAlign on the CPU.
//
// Forward: features are read channels-last ([N, H, W, C], converted once if needed) so that
// every tap of a bin is one contiguous run of channels; a RoI's bins are computed for a block
// of channels into a small tile (bins x channels) and then written to the output in its
// layout. The merged row/column taps of roi_align.h make each bin ny x nx vector updates.
//
// Backward: the same taps in reverse, into a channels-last float accumulator. Work is split
// by (image, channel block), so no two threads ever touch the same element and the order of
// additions into any element (RoI, then bin, then tap) does not depend on the thread count:
// deterministic, no atomics.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_transpose.h"
#include "roi_align/roi_align.h"

namespace maskops {
namespace roi_align {
namespace {

// Channels handled together: a 14x14 tile of 32 floats stays in L1.
constexpr int64_t kChannelBlock = 64;

// The merged taps of every bin of one RoI along one axis.
template <typename T>
struct AxisTaps {
  std::vector<int64_t> idx;
  std::vector<T> w;
  std::vector<int> count;
  int stride = 0;

  void build(T start, T bin, int grid, int64_t pooled, int64_t size) {
    stride = std::max(2 * grid, 1);
    idx.resize(pooled * stride);
    w.resize(pooled * stride);
    count.resize(pooled);
    for (int64_t p = 0; p < pooled; ++p) {
      count[p] = bin_taps(start + static_cast<T>(p) * bin, bin, grid, size,
                          idx.data() + p * stride, w.data() + p * stride);
    }
  }
};

// Hot loops, cloned for AVX-512 and AVX2 with a portable fallback chosen at load time.
#define MASKOPS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// A 64-byte vector of T (GCC vector extension): one zmm register under AVX-512, two ymm under
// AVX2, four xmm otherwise. Written out explicitly because the auto-vectoriser turned the
// channel loop below into scalar code.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
  static type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, 64);
    return v;
  }
  static void store(T* p, type v) { __builtin_memcpy(p, &v, 64); }
};

// tile[bin][0:cb] = sum over taps of wy * wx * feat[row][col][0:cb] for every bin of a RoI.
// `feat` points at channel c0 of image b; rows are H x W x C. Full blocks (cb == kChannelBlock)
// keep the accumulator in vector registers; a ragged last block takes the scalar loop.
template <typename T>
inline __attribute__((always_inline)) void forward_tile_impl(
    T* __restrict tile, const T* __restrict feat, int64_t W, int64_t C, int64_t cb,
    const AxisTaps<T>& ty, const AxisTaps<T>& tx, int64_t PH, int64_t PW) {
  using V = Vec64<T>;
  constexpr int NV = kChannelBlock / V::lanes;
  const bool full = cb == kChannelBlock;
  for (int64_t ph = 0; ph < PH; ++ph) {
    const int64_t* yi = ty.idx.data() + ph * ty.stride;
    const T* yw = ty.w.data() + ph * ty.stride;
    const int ny = ty.count[ph];
    for (int64_t pw = 0; pw < PW; ++pw) {
      const int64_t* xi = tx.idx.data() + pw * tx.stride;
      const T* xw = tx.w.data() + pw * tx.stride;
      const int nx = tx.count[pw];
      T* __restrict out = tile + (ph * PW + pw) * cb;
      if (full) {
        typename V::type acc[NV];
        for (int v = 0; v < NV; ++v) acc[v] = typename V::type{};
        for (int a = 0; a < ny; ++a) {
          const T* row = feat + yi[a] * W * C;
          for (int e = 0; e < nx; ++e) {
            const T* src = row + xi[e] * C;
            const typename V::type wt = typename V::type{} + yw[a] * xw[e];
            for (int v = 0; v < NV; ++v) acc[v] += wt * V::load(src + v * V::lanes);
          }
        }
        for (int v = 0; v < NV; ++v) V::store(out + v * V::lanes, acc[v]);
      } else {  // ragged block: whole vectors accumulate in the tile, then a scalar tail
        const int64_t cv = cb - cb % V::lanes;
        for (int64_t c = 0; c < cb; ++c) out[c] = T(0);
        for (int a = 0; a < ny; ++a) {
          const T* row = feat + yi[a] * W * C;
          for (int e = 0; e < nx; ++e) {
            const T wt = yw[a] * xw[e];
            const T* src = row + xi[e] * C;
            const typename V::type w = typename V::type{} + wt;
            for (int64_t c = 0; c < cv; c += V::lanes)
              V::store(out + c, V::load(out + c) + w * V::load(src + c));
            for (int64_t c = cv; c < cb; ++c) out[c] += wt * src[c];
          }
        }
      }
    }
  }
}

// acc[row][col][0:cb] += wy * wx * tile[bin][0:cb] for every bin of a RoI.
template <typename T>
inline __attribute__((always_inline)) void backward_tile_impl(
    T* __restrict acc, const T* __restrict tile, int64_t W, int64_t C, int64_t cb,
    const AxisTaps<T>& ty, const AxisTaps<T>& tx, int64_t PH, int64_t PW) {
  using V = Vec64<T>;
  constexpr int NV = kChannelBlock / V::lanes;
  const bool full = cb == kChannelBlock;
  for (int64_t ph = 0; ph < PH; ++ph) {
    const int64_t* yi = ty.idx.data() + ph * ty.stride;
    const T* yw = ty.w.data() + ph * ty.stride;
    const int ny = ty.count[ph];
    for (int64_t pw = 0; pw < PW; ++pw) {
      const int64_t* xi = tx.idx.data() + pw * tx.stride;
      const T* xw = tx.w.data() + pw * tx.stride;
      const int nx = tx.count[pw];
      const T* g = tile + (ph * PW + pw) * cb;
      typename V::type gv[NV];
      if (full)
        for (int v = 0; v < NV; ++v) gv[v] = V::load(g + v * V::lanes);
      for (int a = 0; a < ny; ++a) {
        T* row = acc + yi[a] * W * C;
        for (int e = 0; e < nx; ++e) {
          const T wt = yw[a] * xw[e];
          T* dst = row + xi[e] * C;
          if (full) {
            const typename V::type w = typename V::type{} + wt;
            for (int v = 0; v < NV; ++v)
              V::store(dst + v * V::lanes, V::load(dst + v * V::lanes) + w * gv[v]);
          } else {  // ragged block
            const int64_t cv = cb - cb % V::lanes;
            const typename V::type w = typename V::type{} + wt;
            for (int64_t c = 0; c < cv; c += V::lanes)
              V::store(dst + c, V::load(dst + c) + w * V::load(g + c));
            for (int64_t c = cv; c < cb; ++c) dst[c] += wt * g[c];
          }
        }
      }
    }
  }
}

MASKOPS_CLONES void forward_tile(float* tile, const float* feat, int64_t W, int64_t C,
                                 int64_t cb, const AxisTaps<float>& ty,
                                 const AxisTaps<float>& tx, int64_t PH, int64_t PW) {
  forward_tile_impl(tile, feat, W, C, cb, ty, tx, PH, PW);
}
MASKOPS_CLONES void forward_tile(double* tile, const double* feat, int64_t W, int64_t C,
                                 int64_t cb, const AxisTaps<double>& ty,
                                 const AxisTaps<double>& tx, int64_t PH, int64_t PW) {
  forward_tile_impl(tile, feat, W, C, cb, ty, tx, PH, PW);
}
MASKOPS_CLONES void backward_tile(float* acc, const float* tile, int64_t W, int64_t C,
                                  int64_t cb, const AxisTaps<float>& ty,
                                  const AxisTaps<float>& tx, int64_t PH, int64_t PW) {
  backward_tile_impl(acc, tile, W, C, cb, ty, tx, PH, PW);
}
MASKOPS_CLONES void backward_tile(double* acc, const double* tile, int64_t W, int64_t C,
                                  int64_t cb, const AxisTaps<double>& ty,
                                  const AxisTaps<double>& tx, int64_t PH, int64_t PW) {
  backward_tile_impl(acc, tile, W, C, cb, ty, tx, PH, PW);
}

void check_args(const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w) {
  check_floating(rois, "rois");
  check_dim(rois, 2, "rois");
  TORCH_CHECK(rois.size(1) == 5, "rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got ",
              rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "output_size must be positive, got (", pooled_h,
              ", ", pooled_w, ")");
}

// The CPU path refuses RoIs whose batch index is outside [0, batch_size) (cheap to check here).
template <typename T>
void check_batch_indices(const T* rois, int64_t K, int64_t N) {
  for (int64_t k = 0; k < K; ++k) {
    const T b = rois[5 * k];
    TORCH_CHECK(b >= T(0) && b < static_cast<T>(N), "rois[", k, ", 0] (batch index) is ",
                static_cast<double>(b), ", expected an index in [0, ", N, ")");
  }
}

at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
Params<T> make_params(int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW,
                      int64_t K, double scale, int64_t sampling_ratio, bool aligned) {
  return Params<T>{N, C, H, W, PH, PW, K, static_cast<T>(scale), sampling_ratio, aligned};
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                 int64_t sampling_ratio, bool aligned) {
  check_floating(input, "input");
  check_dim(input, 4, "input");
  check_args(rois, pooled_h, pooled_w);
  check_same_device(input, rois, "input", "rois");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  const auto fmt = output_memory_format(input);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const bool out_channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType mt = math_type(input.scalar_type());
  // Channels-last features in the math type: one contiguous run of channels per tap.
  const at::Tensor feat = input.to(mt).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor rois_m = rois.to(mt).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "roi_align_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* rp = rois_m.data_ptr<T>();
    check_batch_indices(rp, K, N);
    const auto p = make_params<T>(N, C, H, W, pooled_h, pooled_w, K, spatial_scale,
                                  sampling_ratio, aligned);
    const T* fp = feat.data_ptr<T>();
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      AxisTaps<T> ty, tx;
      std::vector<T> tile(bins * std::min(C, kChannelBlock));
      for (int64_t k = k0; k < k1; ++k) {
        const RoiBox<T> b = p.box(rp, k);
        ty.build(b.start_h, b.bin_h, b.grid_h, pooled_h, H);
        tx.build(b.start_w, b.bin_w, b.grid_w, pooled_w, W);
        const T* image = fp + b.batch * H * W * C;
        for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
          const int64_t cb = std::min(kChannelBlock, C - c0);
          forward_tile(tile.data(), image + c0, W, C, cb, ty, tx, pooled_h, pooled_w);
          if (out_channels_last) {  // out[k][bin][c]
            scalar_t* o = out + k * bins * C + c0;
            for (int64_t s = 0; s < bins; ++s)
              for (int64_t c = 0; c < cb; ++c)
                o[s * C + c] = static_cast<scalar_t>(tile[s * cb + c]);
          } else {  // out[k][c][bin]
            transpose(tile.data(), bins, cb, cb, out + (k * C + c0) * bins, bins);
          }
        }
      }
    });
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t batch_size, int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio, bool aligned) {
  check_floating(grad, "grad");
  check_dim(grad, 4, "grad");
  check_args(rois, pooled_h, pooled_w);
  check_same_device(grad, rois, "grad", "rois");
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.size(0) == K && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "grad must have shape [", K, ", ", channels, ", ", pooled_h, ", ", pooled_w,
              "], got ", grad.sizes());
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0,
              "input sizes must be non-negative");
  const int64_t N = batch_size, C = channels, H = height, W = width;
  const auto fmt = output_memory_format(grad);
  const at::ScalarType mt = math_type(grad.scalar_type());
  // Channels-last accumulator ([N, H, W, C]) in the math type.
  at::Tensor acc = at::zeros({N, H, W, C}, grad.options().dtype(mt));
  if (acc.numel() > 0 && K > 0) {
    const at::Tensor rois_m = rois.to(mt).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "roi_align_backward_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const T* rp = rois_m.data_ptr<T>();
      check_batch_indices(rp, K, N);
      const auto p = make_params<T>(N, C, H, W, pooled_h, pooled_w, K, spatial_scale,
                                    sampling_ratio, aligned);
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const GradStrides gs{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      const bool dense_nchw = grad.is_contiguous();
      T* ap = acc.data_ptr<T>();
      const int64_t bins = pooled_h * pooled_w;
      const int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
      // One task per (image, channel block): disjoint outputs, thread-count-independent sums.
      at::parallel_for(0, N * nblocks, 1, [&](int64_t t0, int64_t t1) {
        AxisTaps<T> ty, tx;
        std::vector<T> tile(bins * std::min(C, kChannelBlock));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / nblocks;
          const int64_t c0 = (t % nblocks) * kChannelBlock;
          const int64_t cb = std::min(kChannelBlock, C - c0);
          T* image = ap + n * H * W * C + c0;
          for (int64_t k = 0; k < K; ++k) {
            const RoiBox<T> b = p.box(rp, k);
            if (b.batch != n) continue;
            ty.build(b.start_h, b.bin_h, b.grid_h, pooled_h, H);
            tx.build(b.start_w, b.bin_w, b.grid_w, pooled_w, W);
            if (dense_nchw) {  // grad[k][c][bin] -> tile[bin][c]
              transpose(gp + gs.at(k, c0, 0, 0), cb, bins, bins, tile.data(), cb);
            } else {
              for (int64_t ph = 0; ph < pooled_h; ++ph) {
                for (int64_t pw = 0; pw < pooled_w; ++pw) {
                  T* dst = tile.data() + (ph * pooled_w + pw) * cb;
                  for (int64_t c = 0; c < cb; ++c)
                    dst[c] = static_cast<T>(gp[gs.at(k, c0 + c, ph, pw)]);
                }
              }
            }
            backward_tile(image, tile.data(), W, C, cb, ty, tx, pooled_h, pooled_w);
          }
        }
      });
    });
  }
  // [N, H, W, C] is the channels-last layout of [N, C, H, W].
  at::Tensor grad_input = acc.permute({0, 3, 1, 2});
  return grad_input.to(grad.scalar_type()).contiguous(fmt);
}

// ---- Test-only: the CUDA algorithms' functors run on the CPU (see csrc/README.md). ----

at::Tensor roi_align_forward_elementwise_cpu(const at::Tensor& input, const at::Tensor& rois,
                                             double spatial_scale, int64_t pooled_h,
                                             int64_t pooled_w, int64_t sampling_ratio,
                                             bool aligned) {
  check_floating(input, "input");
  check_dim(input, 4, "input");
  check_args(rois, pooled_h, pooled_w);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  const auto fmt = output_memory_format(input);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const at::Tensor rois_m = rois.to(math_type(input.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "roi_align_forward_elementwise_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    ForwardElement<scalar_t, T> f{
        make_params<T>(N, C, H, W, pooled_h, pooled_w, K, spatial_scale, sampling_ratio,
                       aligned),
        input.data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2),
        input.stride(3), rois_m.data_ptr<T>(), output.data_ptr<scalar_t>(),
        fmt == at::MemoryFormat::ChannelsLast};
    cpu_for_each(output.numel(), 1024, f);
  });
  return output;
}

at::Tensor roi_align_backward_cuda_algo_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                            double spatial_scale, int64_t pooled_h,
                                            int64_t pooled_w, int64_t batch_size,
                                            int64_t channels, int64_t height, int64_t width,
                                            int64_t sampling_ratio, bool aligned,
                                            bool deterministic) {
  check_floating(grad, "grad");
  check_dim(grad, 4, "grad");
  check_args(rois, pooled_h, pooled_w);
  const int64_t K = rois.size(0);
  const at::ScalarType mt = math_type(grad.scalar_type());
  at::Tensor acc = at::zeros({batch_size, channels, height, width}, grad.options().dtype(mt));
  if (acc.numel() == 0 || K == 0) return acc.to(grad.scalar_type());
  const at::Tensor rois_m = rois.to(mt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "roi_align_backward_cuda_algo_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = make_params<T>(batch_size, channels, height, width, pooled_h, pooled_w, K,
                                  spatial_scale, sampling_ratio, aligned);
    const GradStrides gs{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
    if (deterministic) {
      BackwardGather<scalar_t, T> f{p, grad.data_ptr<scalar_t>(), gs, rois_m.data_ptr<T>(),
                                    acc.data_ptr<T>()};
      cpu_for_each(acc.numel(), 256, f);
    } else {
      // Scatter bodies add into shared addresses: on the host they run serially.
      BackwardScatter<scalar_t, T> f{p, grad.data_ptr<scalar_t>(), gs, rois_m.data_ptr<T>(),
                                     acc.data_ptr<T>()};
      cpu_for_each_serial(grad.numel(), f);
    }
  });
  return acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
  m.impl("_roi_align_forward_elementwise", &roi_align_forward_elementwise_cpu);
  m.impl("_roi_align_backward_cuda_algo", &roi_align_backward_cuda_algo_cpu);
}

}  // namespace roi_align
}  // namespace maskops
