// RoIAlign on the CPU, single-level and multi-level (a feature pyramid; single-level RoIAlign
// is its one-level case). Each RoI reads the level LevelMap picks for it.
//
// Two layouts, two loops over the same merged taps (roi_align.h):
// - channels-last features ([N, H, W, C]): each tap is one contiguous run of channels, so a
//   bin is ny x nx vector updates of a block of channels into a (bins x channels) tile, which
//   is then written to the output in its layout (a vectorised transpose for NCHW outputs).
// - NCHW features ([N, C, H, W]): per channel plane, the row taps of a bin row are first
//   combined into one row (vectorised over x), then each bin reads its column taps from it.
//   No layout conversion of the (possibly large) pyramid is needed.
//
// Backward runs the same taps in reverse. Work is split by (level, image, channel block), so
// no two threads touch the same element and the order of additions into any element (RoI,
// then bin, then tap) does not depend on the thread count: deterministic, no atomics.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_allocator.h"
#include "common/cpu_chunks.h"
#include "common/cpu_isa.h"
#include "common/cpu_transpose.h"
#include "roi_align/roi_align.h"
#include "roi_align/roi_align_args.h"
#include "roi_align/roi_align_host.h"

namespace maskops {
namespace roi_align {
namespace {

// Channels handled together in the channels-last loops (4 AVX-512 registers of floats).
constexpr int64_t kChannelBlock = 64;
// Channels per backward task in the NCHW loops.
constexpr int64_t kPlaneBlock = 16;

// The merged taps of every bin of one RoI along one axis, and the index span they cover.
template <typename T>
struct AxisTaps {
  std::vector<int64_t> idx;
  std::vector<T> w;
  std::vector<int> count;
  int stride = 0;
  int64_t lo = 0, hi = -1;  // smallest and largest index read (hi < lo: none)

  void build(T start, T bin, int grid, int64_t pooled, int64_t size) {
    stride = std::max(2 * grid, 1);
    idx.resize(pooled * stride);
    w.resize(pooled * stride);
    count.resize(pooled);
    lo = size;
    hi = -1;
    for (int64_t p = 0; p < pooled; ++p) {
      int64_t* ip = idx.data() + p * stride;
      const int n =
          bin_taps(start + static_cast<T>(p) * bin, bin, grid, size, ip, w.data() + p * stride);
      count[p] = n;
      for (int i = 0; i < n; ++i) {  // (inverted boxes list their taps in descending order)
        lo = std::min(lo, ip[i]);
        hi = std::max(hi, ip[i]);
      }
    }
  }
};

// A vector of `Bytes` bytes of T (GCC vector extension): each SIMD level uses its register
// width (64 for AVX-512, 32 for AVX2, 16 for SSE2), since GCC lowers wider vectors lane by
// lane for some operations. Written out explicitly because the auto-vectoriser turned the
// channel loops below into scalar code.
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int lanes = Bytes / sizeof(T);
  static type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, Bytes);
    return v;
  }
  static void store(T* p, type v) { __builtin_memcpy(p, &v, Bytes); }
  static type splat(T s) { return type{} + s; }
};

// A vector of T read from S storage: the same type, or bfloat16 widened to float (its bits are
// float's upper half: a shift, exact), so that bfloat16 features are read as they are stored
// instead of converted to a float copy of the whole pyramid first.
template <int Bytes, typename T, typename S>
inline __attribute__((always_inline)) typename Vec<T, Bytes>::type load_as(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return Vec<T, Bytes>::load(p);
  } else {
    static_assert(std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>);
    typename Vec<uint16_t, Bytes / 2>::type h;
    __builtin_memcpy(&h, p, Bytes / 2);
    using u32s = typename Vec<uint32_t, Bytes>::type;
    const u32s w = __builtin_convertvector(h, u32s) << 16;
    typename Vec<float, Bytes>::type f;
    __builtin_memcpy(&f, &w, Bytes);
    return f;
  }
}

// dst[0:n] += w * src[0:n]
template <int Bytes, typename T>
inline __attribute__((always_inline)) void axpy(T* dst, const T* src, T w, int64_t n) {
  using V = Vec<T, Bytes>;
  const int64_t nv = n - n % V::lanes;
  const typename V::type wv = V::splat(w);
  for (int64_t c = 0; c < nv; c += V::lanes)
    V::store(dst + c, V::load(dst + c) + wv * V::load(src + c));
  for (int64_t c = nv; c < n; ++c) dst[c] += w * src[c];
}

// ---- channels-last loops ----

// tile[bin][0:cb] = sum over taps of wy * wx * feat[row][col][0:cb] for every bin of a RoI.
// `feat` points at channel c0 of one image; rows are W x C. Full blocks keep the accumulator
// in vector registers.
template <int Bytes, typename T, typename S>
inline __attribute__((always_inline)) void forward_tile_impl(
    T* __restrict tile, const S* __restrict feat, int64_t W, int64_t C, int64_t cb,
    const AxisTaps<T>& ty, const AxisTaps<T>& tx, int64_t PH, int64_t PW) {
  using V = Vec<T, Bytes>;
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
          const S* row = feat + yi[a] * W * C;
          for (int e = 0; e < nx; ++e) {
            const S* src = row + xi[e] * C;
            const typename V::type wt = V::splat(yw[a] * xw[e]);
            for (int v = 0; v < NV; ++v) acc[v] += wt * load_as<Bytes, T>(src + v * V::lanes);
          }
        }
        for (int v = 0; v < NV; ++v) V::store(out + v * V::lanes, acc[v]);
      } else {
        for (int64_t c = 0; c < cb; ++c) out[c] = T(0);
        for (int a = 0; a < ny; ++a) {
          const S* row = feat + yi[a] * W * C;
          for (int e = 0; e < nx; ++e) {
            const S* src = row + xi[e] * C;
            const T wt = yw[a] * xw[e];
            if constexpr (std::is_same_v<S, T>) {
              axpy<Bytes>(out, src, wt, cb);
            } else {
              for (int64_t c = 0; c < cb; ++c) out[c] += wt * static_cast<T>(src[c]);
            }
          }
        }
      }
    }
  }
}

// acc[row][col][0:cb] += wy * wx * tile[bin][0:cb] for every bin of a RoI.
template <int Bytes, typename T>
inline __attribute__((always_inline)) void backward_tile_impl(
    T* __restrict acc, const T* __restrict tile, int64_t W, int64_t C, int64_t cb,
    const AxisTaps<T>& ty, const AxisTaps<T>& tx, int64_t PH, int64_t PW) {
  using V = Vec<T, Bytes>;
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
            const typename V::type w = V::splat(wt);
            for (int v = 0; v < NV; ++v)
              V::store(dst + v * V::lanes, V::load(dst + v * V::lanes) + w * gv[v]);
          } else {
            axpy<Bytes>(dst, g, wt, cb);
          }
        }
      }
    }
  }
}

// ---- NCHW (plane) loops ----

// out[bin * out_stride] for every bin of one RoI and one channel plane ([H, W]); `rowbuf`
// holds one combined row over the RoI's column span.
template <int Bytes, typename T, typename O>
inline __attribute__((always_inline)) void forward_plane_impl(O* out, int64_t out_stride,
                                                              const T* __restrict plane, int64_t W,
                                                              const AxisTaps<T>& ty,
                                                              const AxisTaps<T>& tx, int64_t PH,
                                                              int64_t PW, T* __restrict rowbuf) {
  const int64_t span = tx.hi - tx.lo + 1;
  for (int64_t ph = 0; ph < PH; ++ph) {
    const int64_t* yi = ty.idx.data() + ph * ty.stride;
    const T* yw = ty.w.data() + ph * ty.stride;
    const int ny = ty.count[ph];
    O* o = out + ph * PW * out_stride;
    if (ny == 0 || span <= 0) {
      for (int64_t pw = 0; pw < PW; ++pw) o[pw * out_stride] = static_cast<O>(T(0));
      continue;
    }
    for (int64_t x = 0; x < span; ++x) rowbuf[x] = T(0);
    for (int a = 0; a < ny; ++a) axpy<Bytes>(rowbuf, plane + yi[a] * W + tx.lo, yw[a], span);
    for (int64_t pw = 0; pw < PW; ++pw) {
      const int64_t* xi = tx.idx.data() + pw * tx.stride;
      const T* xw = tx.w.data() + pw * tx.stride;
      T v = T(0);
      for (int e = 0; e < tx.count[pw]; ++e) v += xw[e] * rowbuf[xi[e] - tx.lo];
      o[pw * out_stride] = static_cast<O>(v);
    }
  }
}

// plane[H, W] += the bins' gradient g[bin] spread over their taps (one RoI, one channel).
template <int Bytes, typename T>
inline __attribute__((always_inline)) void backward_plane_impl(T* plane, int64_t W,
                                                               const T* __restrict g,
                                                               const AxisTaps<T>& ty,
                                                               const AxisTaps<T>& tx, int64_t PH,
                                                               int64_t PW, T* __restrict rowbuf) {
  const int64_t span = tx.hi - tx.lo + 1;
  if (span <= 0) return;
  for (int64_t ph = 0; ph < PH; ++ph) {
    const int ny = ty.count[ph];
    if (ny == 0) continue;
    for (int64_t x = 0; x < span; ++x) rowbuf[x] = T(0);
    for (int64_t pw = 0; pw < PW; ++pw) {
      const int64_t* xi = tx.idx.data() + pw * tx.stride;
      const T* xw = tx.w.data() + pw * tx.stride;
      const T gv = g[ph * PW + pw];
      for (int e = 0; e < tx.count[pw]; ++e) rowbuf[xi[e] - tx.lo] += xw[e] * gv;
    }
    const int64_t* yi = ty.idx.data() + ph * ty.stride;
    const T* yw = ty.w.data() + ph * ty.stride;
    for (int a = 0; a < ny; ++a) axpy<Bytes>(plane + yi[a] * W + tx.lo, rowbuf, yw[a], span);
  }
}

// Hot loops, compiled for AVX-512, AVX2 and portable code, each with its register width; each
// call takes the variant of maskops::cpu_isa() (common/cpu_isa.h).
#define MASKOPS_INSTANTIATE(T)                                                           \
  MASKOPS_ISA_VARIANTS_WIDTH(                                                            \
      void, forward_tile,                                                                \
      (T * tile, const T* feat, int64_t W, int64_t C, int64_t cb, const AxisTaps<T>& ty, \
       const AxisTaps<T>& tx, int64_t PH, int64_t PW),                                   \
      (tile, feat, W, C, cb, ty, tx, PH, PW), forward_tile_impl)                         \
  MASKOPS_ISA_VARIANTS_WIDTH(                                                            \
      void, backward_tile,                                                               \
      (T * acc, const T* tile, int64_t W, int64_t C, int64_t cb, const AxisTaps<T>& ty,  \
       const AxisTaps<T>& tx, int64_t PH, int64_t PW),                                   \
      (acc, tile, W, C, cb, ty, tx, PH, PW), backward_tile_impl)                         \
  MASKOPS_ISA_VARIANTS_WIDTH(                                                            \
      void, forward_plane,                                                               \
      (T * out, int64_t out_stride, const T* plane, int64_t W, const AxisTaps<T>& ty,    \
       const AxisTaps<T>& tx, int64_t PH, int64_t PW, T* rowbuf),                        \
      (out, out_stride, plane, W, ty, tx, PH, PW, rowbuf), forward_plane_impl)           \
  MASKOPS_ISA_VARIANTS_WIDTH(void, backward_plane,                                       \
                             (T * plane, int64_t W, const T* g, const AxisTaps<T>& ty,   \
                              const AxisTaps<T>& tx, int64_t PH, int64_t PW, T* rowbuf), \
                             (plane, W, g, ty, tx, PH, PW, rowbuf), backward_plane_impl)
MASKOPS_INSTANTIATE(float)
MASKOPS_INSTANTIATE(double)
#undef MASKOPS_INSTANTIATE
MASKOPS_ISA_VARIANTS_WIDTH(void, forward_tile,
                           (float* tile, const c10::BFloat16* feat, int64_t W, int64_t C,
                            int64_t cb, const AxisTaps<float>& ty, const AxisTaps<float>& tx,
                            int64_t PH, int64_t PW),
                           (tile, feat, W, C, cb, ty, tx, PH, PW), forward_tile_impl)

// forward_tile over image[offset:] in T, or, where a level is read as stored in bfloat16
// (bf != nullptr, float math only), over bf[offset:].
template <typename T>
inline void forward_tile_from(T* tile, const T* image, const c10::BFloat16*, int64_t offset,
                              int64_t W, int64_t C, int64_t cb, const AxisTaps<T>& ty,
                              const AxisTaps<T>& tx, int64_t PH, int64_t PW) {
  forward_tile(tile, image + offset, W, C, cb, ty, tx, PH, PW);
}

inline void forward_tile_from(float* tile, const float* image, const c10::BFloat16* bf,
                              int64_t offset, int64_t W, int64_t C, int64_t cb,
                              const AxisTaps<float>& ty, const AxisTaps<float>& tx, int64_t PH,
                              int64_t PW) {
  if (bf != nullptr) {
    forward_tile(tile, bf + offset, W, C, cb, ty, tx, PH, PW);
  } else {
    forward_tile(tile, image + offset, W, C, cb, ty, tx, PH, PW);
  }
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

// Runs f(n, p0, np) for the blocks of np <= 64 spatial positions from p0 of N images, in
// parallel: the cache-sized tasks of the layout conversions below.
template <typename F>
void for_spatial_blocks(int64_t N, int64_t HW, const F& f) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (HW + kBlock - 1) / kBlock;
  parallel_for_dynamic(N * blocks, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = (t % blocks) * kBlock;
      f(t / blocks, p0, std::min(kBlock, HW - p0));
    }
  });
}

// A level in the math type, channels-last ([N, H, W, C] memory). Float NCHW input is
// transposed here in cache-sized blocks on every thread (several times faster than a generic
// strided copy); anything else goes through ATen.
at::Tensor channels_last_copy(const at::Tensor& x, at::ScalarType mt) {
  if (x.scalar_type() != at::kFloat || mt != at::kFloat || !x.is_contiguous() || x.numel() == 0)
    return x.to(mt).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = cpu_empty(x.sizes(), at::kFloat, at::MemoryFormat::ChannelsLast);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for_spatial_blocks(N, HW, [&](int64_t n, int64_t p0, int64_t np) {
    transpose(src + n * C * HW + p0, C, np, HW, dst + (n * HW + p0) * C, C);
  });
  return out;
}

// The inverse of channels_last_copy: a contiguous [N, C, H, W] copy of an [N, H, W, C] tensor.
at::Tensor nhwc_to_nchw(const at::Tensor& x) {
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), HW = H * W;
  at::Tensor out = cpu_empty({N, C, H, W}, x.scalar_type());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nhwc_to_nchw", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_spatial_blocks(N, HW, [&](int64_t n, int64_t p0, int64_t np) {
      transpose(src + (n * HW + p0) * C, np, C, C, dst + n * C * HW + p0, HW);
    });
  });
  return out;
}

// How many RoIs read each level.
template <typename T>
std::vector<int64_t> rois_per_level(const Params<T>& p, const T* rois, int64_t K) {
  std::vector<int64_t> count(p.num_levels, 0);
  for (int64_t k = 0; k < K; ++k) {
    const int l = p.level_of(rois + 5 * k);
    if (l >= 0) ++count[l];
  }
  return count;
}

// Which loop reads a level: the channels-last one is an order of magnitude faster per output
// (measured here: ~2 ns against ~25 ns per output element on a 200x200x256 level, where the
// NCHW loop misses cache on every row), but a level not already channels-last must first be
// converted (~2 ns per element; in backward, accumulated and converted back). So convert
// unless the level is much larger than the outputs read from it (a big level read by a
// handful of RoIs).
constexpr int64_t kConvertRatio = 8;

bool prefer_channels_last(const at::Tensor& level, int64_t rois, int64_t bins) {
  if (output_memory_format(level) == at::MemoryFormat::ChannelsLast) return true;
  return level.numel() <= kConvertRatio * rois * level.size(1) * bins;
}

// ---- the kernels ----

at::Tensor pyramid_forward(at::TensorList features, const at::Tensor& rois,
                           at::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w,
                           int64_t sampling_ratio, bool aligned, double canonical_scale,
                           double canonical_level, int64_t k_min) {
  check_features(features, rois, scales);
  check_rois(rois, pooled_h, pooled_w);
  const at::Tensor& f0 = features[0];
  const int64_t N = f0.size(0), C = f0.size(1), K = rois.size(0);
  const int L = static_cast<int>(features.size());
  const auto fmt = output_memory_format(f0);
  at::Tensor output = cpu_empty({K, C, pooled_h, pooled_w}, f0.scalar_type(), fmt);
  if (output.numel() == 0) return output;
  const at::ScalarType mt = math_type(f0.scalar_type());
  const at::Tensor rois_m = rois.to(mt).contiguous();
  const auto heights = sizes_of(features, 2), widths = sizes_of(features, 3);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const T* rp = rois_m.data_ptr<T>();
        check_batch_indices(rp, K, N);
        const auto p =
            make_params<T>(N, C, heights, widths, scales, pooled_h, pooled_w, K, sampling_ratio,
                           aligned, canonical_scale, canonical_level, k_min);
        const std::vector<int64_t> count = rois_per_level(p, rp, K);
        std::vector<at::Tensor> data(L);
        std::vector<bool> nhwc(L);
        // bfloat16 levels already channels-last are read as stored (widened per load).
        constexpr bool kReadsBf16 =
            std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>;
        std::vector<const c10::BFloat16*> bf(L, nullptr);
        for (int l = 0; l < L; ++l) {
          nhwc[l] = prefer_channels_last(features[l], count[l], pooled_h * pooled_w);
          if (kReadsBf16 && nhwc[l] && features[l].is_contiguous(at::MemoryFormat::ChannelsLast)) {
            bf[l] = features[l].data_ptr<c10::BFloat16>();
            continue;
          }
          data[l] = nhwc[l] ? channels_last_copy(features[l], mt) : features[l].to(mt).contiguous();
        }
        std::vector<const T*> fp(L, nullptr);
        for (int l = 0; l < L; ++l)
          if (bf[l] == nullptr) fp[l] = data[l].data_ptr<T>();
        scalar_t* out = output.data_ptr<scalar_t>();
        const int64_t bins = pooled_h * pooled_w;
        // Output strides of channel and bin ([K, C, bins] or [K, bins, C]).
        const bool out_cl = fmt == at::MemoryFormat::ChannelsLast;
        const int64_t o_c = out_cl ? 1 : bins, o_bin = out_cl ? C : 1;
        int64_t max_w = 1;
        for (int l = 0; l < L; ++l) max_w = std::max(max_w, widths[l]);
        // RoIs in small chunks taken by whichever thread is free (common/cpu_chunks.h): a core
        // shared with another process does not hold up the others.
        parallel_for_dynamic(K, 8, [&](int64_t k0, int64_t k1) {
          AxisTaps<T> ty, tx;
          std::vector<T> tile(bins * std::min(C, kChannelBlock));
          std::vector<T> rowbuf(max_w);
          for (int64_t k = k0; k < k1; ++k) {
            scalar_t* ok = out + k * C * bins;
            const int l = p.level_of(rp + 5 * k);
            if (l < 0) {  // no level: zeros
              std::fill(ok, ok + C * bins, static_cast<scalar_t>(0));
              continue;
            }
            const RoiBox<T> b = p.box(rp, k, l);
            const int64_t H = heights[l], W = widths[l];
            ty.build(b.start_h, b.bin_h, b.grid_h, pooled_h, H);
            tx.build(b.start_w, b.bin_w, b.grid_w, pooled_w, W);
            const int64_t at = b.batch * H * W * C;  // the RoI's image in the level
            const T* image = fp[l] == nullptr ? nullptr : fp[l] + at;
            const c10::BFloat16* image_bf = bf[l] == nullptr ? nullptr : bf[l] + at;
            if (nhwc[l]) {
              for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
                const int64_t cb = std::min(kChannelBlock, C - c0);
                forward_tile_from(tile.data(), image, image_bf, c0, W, C, cb, ty, tx, pooled_h,
                                  pooled_w);
                if (out_cl) {
                  for (int64_t s = 0; s < bins; ++s)
                    for (int64_t c = 0; c < cb; ++c)
                      ok[s * C + c0 + c] = static_cast<scalar_t>(tile[s * cb + c]);
                } else {
                  transpose(tile.data(), bins, cb, cb, ok + c0 * bins, bins);
                }
              }
            } else if (std::is_same_v<T, scalar_t>) {  // (the cast is a no-op on this branch)
              for (int64_t c = 0; c < C; ++c)
                forward_plane(reinterpret_cast<T*>(ok) + c * o_c, o_bin, image + c * H * W, W, ty,
                              tx, pooled_h, pooled_w, rowbuf.data());
            } else {  // half types: compute a plane's bins in T, then round
              for (int64_t c = 0; c < C; ++c) {
                forward_plane(tile.data(), 1, image + c * H * W, W, ty, tx, pooled_h, pooled_w,
                              rowbuf.data());
                for (int64_t s = 0; s < bins; ++s)
                  ok[c * o_c + s * o_bin] = static_cast<scalar_t>(tile[s]);
              }
            }
          }
        });
      });
  return output;
}

std::vector<at::Tensor> pyramid_backward(const at::Tensor& grad, const at::Tensor& rois,
                                         at::ArrayRef<double> scales, int64_t pooled_h,
                                         int64_t pooled_w, int64_t batch_size, int64_t channels,
                                         at::IntArrayRef heights, at::IntArrayRef widths,
                                         int64_t sampling_ratio, bool aligned,
                                         double canonical_scale, double canonical_level,
                                         int64_t k_min) {
  check_backward_args(grad, rois, scales, pooled_h, pooled_w, batch_size, channels, heights,
                      widths);
  const int L = static_cast<int>(scales.size());
  const int64_t K = rois.size(0), N = batch_size, C = channels;
  const at::ScalarType mt = math_type(grad.scalar_type());
  const auto fmt = output_memory_format(grad);
  // Each level accumulates channels-last ([N, H, W, C]) or as NCHW planes (see
  // prefer_channels_last); a channels-last grad means channels-last inputs.
  std::vector<at::Tensor> acc(L);
  std::vector<bool> nhwc(L, fmt == at::MemoryFormat::ChannelsLast);
  const at::Tensor rois_m = rois.to(mt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const T* rp = rois_m.data_ptr<T>();
        if (N > 0) check_batch_indices(rp, K, N);
        const auto p =
            make_params<T>(N, C, heights, widths, scales, pooled_h, pooled_w, K, sampling_ratio,
                           aligned, canonical_scale, canonical_level, k_min);
        const std::vector<int64_t> count = rois_per_level(p, rp, K);
        for (int l = 0; l < L; ++l) {
          const int64_t numel = N * C * heights[l] * widths[l];
          nhwc[l] = nhwc[l] || numel <= kConvertRatio * count[l] * C * pooled_h * pooled_w;
          acc[l] = nhwc[l] ? cpu_empty({N, heights[l], widths[l], C}, mt)
                           : cpu_empty({N, C, heights[l], widths[l]}, mt);
          acc[l].zero_();
        }
        if (K > 0 && N > 0 && C > 0) {
          // The RoIs of each (level, image), in index order: the order of the additions.
          std::vector<std::vector<int64_t>> members(L * N);
          for (int64_t k = 0; k < K; ++k) {
            const int l = p.level_of(rp + 5 * k);
            if (l >= 0) members[l * N + static_cast<int64_t>(rp[5 * k])].push_back(k);
          }
          std::vector<T*> ap(L);
          for (int l = 0; l < L; ++l) ap[l] = acc[l].data_ptr<T>();
          const scalar_t* gp = grad.data_ptr<scalar_t>();
          const GradStrides gs{grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
          const bool dense_nchw = grad.is_contiguous();
          const int64_t bins = pooled_h * pooled_w;
          // Same block width for both loops so tasks map the same way on every level.
          const int64_t block = kChannelBlock;
          const int64_t nblocks = (C + block - 1) / block;
          int64_t max_w = 1;
          for (int l = 0; l < L; ++l) max_w = std::max<int64_t>(max_w, widths[l]);
          parallel_for_dynamic(L * N * nblocks, 1, [&](int64_t t0, int64_t t1) {
            AxisTaps<T> ty, tx;
            std::vector<T> tile(bins * std::min(C, block));
            std::vector<T> rowbuf(max_w);
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t ln = t / nblocks;
              const int l = static_cast<int>(ln / N);
              const int64_t n = ln % N;
              const int64_t c0 = (t % nblocks) * block;
              const int64_t cb = std::min(block, C - c0);
              const int64_t H = heights[l], W = widths[l];
              const bool cl = nhwc[l];
              for (const int64_t k : members[ln]) {
                const RoiBox<T> b = p.box(rp, k, l);
                ty.build(b.start_h, b.bin_h, b.grid_h, pooled_h, H);
                tx.build(b.start_w, b.bin_w, b.grid_w, pooled_w, W);
                // tile[bin][c] in nhwc mode, tile[c][bin] in plane mode, in T.
                if (cl && dense_nchw) {
                  transpose(gp + gs.at(k, c0, 0, 0), cb, bins, bins, tile.data(), cb);
                } else if (cl && gs.c == 1) {  // channels-last grad: runs of channels per bin
                  for (int64_t ph = 0; ph < pooled_h; ++ph)
                    for (int64_t pw = 0; pw < pooled_w; ++pw) {
                      const scalar_t* src = gp + gs.at(k, c0, ph, pw);
                      T* dst = tile.data() + (ph * pooled_w + pw) * cb;
                      for (int64_t c = 0; c < cb; ++c) dst[c] = static_cast<T>(src[c]);
                    }
                } else {
                  for (int64_t c = 0; c < cb; ++c)
                    for (int64_t ph = 0; ph < pooled_h; ++ph)
                      for (int64_t pw = 0; pw < pooled_w; ++pw) {
                        const int64_t s = ph * pooled_w + pw;
                        tile[cl ? s * cb + c : c * bins + s] =
                            static_cast<T>(gp[gs.at(k, c0 + c, ph, pw)]);
                      }
                }
                if (cl) {
                  backward_tile(ap[l] + n * H * W * C + c0, tile.data(), W, C, cb, ty, tx, pooled_h,
                                pooled_w);
                } else {
                  for (int64_t c = 0; c < cb; ++c)
                    backward_plane(ap[l] + (n * C + c0 + c) * H * W, W, tile.data() + c * bins, ty,
                                   tx, pooled_h, pooled_w, rowbuf.data());
                }
              }
            }
          });
        }
      });
  std::vector<at::Tensor> out(L);
  for (int l = 0; l < L; ++l) {
    if (nhwc[l] && mt == grad.scalar_type() && fmt == at::MemoryFormat::Contiguous) {
      out[l] = nhwc_to_nchw(acc[l]);
      continue;
    }
    // [N, H, W, C] is the channels-last layout of [N, C, H, W].
    at::Tensor g = nhwc[l] ? acc[l].permute({0, 3, 1, 2}) : acc[l];
    out[l] = g.to(grad.scalar_type()).contiguous(fmt);
  }
  return out;
}

// ---- registered entry points ----

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                 int64_t sampling_ratio, bool aligned) {
  check_input(input);
  return pyramid_forward({input}, rois, {spatial_scale}, pooled_h, pooled_w, sampling_ratio,
                         aligned, 224.0, 4.0, 0);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t batch_size, int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio, bool aligned) {
  return pyramid_backward(grad, rois, {spatial_scale}, pooled_h, pooled_w, batch_size, channels,
                          {height}, {width}, sampling_ratio, aligned, 224.0, 4.0, 0)[0];
}

// ---- Test-only: the CUDA algorithms' functors run on the CPU (see csrc/README.md). ----

at::Tensor forward_elementwise_cpu(at::TensorList features, const at::Tensor& rois,
                                   at::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w,
                                   int64_t sampling_ratio, bool aligned, double canonical_scale,
                                   double canonical_level, int64_t k_min) {
  check_features(features, rois, scales);
  check_rois(rois, pooled_h, pooled_w);
  const at::Tensor& f0 = features[0];
  const int64_t K = rois.size(0);
  const auto fmt = output_memory_format(f0);
  at::Tensor output =
      at::empty({K, f0.size(1), pooled_h, pooled_w}, f0.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  const at::Tensor rois_m = rois.to(math_type(f0.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_elementwise_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        ForwardElement<scalar_t, T> f{};
        f.p = make_params<T>(f0.size(0), f0.size(1), sizes_of(features, 2), sizes_of(features, 3),
                             scales, pooled_h, pooled_w, K, sampling_ratio, aligned,
                             canonical_scale, canonical_level, k_min);
        for (size_t l = 0; l < features.size(); ++l) {
          const at::Tensor& x = features[l];
          f.level[l] = {x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
        }
        f.rois = rois_m.data_ptr<T>();
        f.output = output.data_ptr<scalar_t>();
        f.channels_last = fmt == at::MemoryFormat::ChannelsLast;
        cpu_for_each(output.numel(), 1024, f);
      });
  return output;
}

std::vector<at::Tensor> backward_cuda_algo_cpu(
    const at::Tensor& grad, const at::Tensor& rois, at::ArrayRef<double> scales, int64_t pooled_h,
    int64_t pooled_w, int64_t batch_size, int64_t channels, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sampling_ratio, bool aligned, double canonical_scale,
    double canonical_level, int64_t k_min, bool deterministic) {
  // Scatter bodies add into shared addresses: on the host they run serially.
  return backward_gpu_algo(
      grad, rois, scales, pooled_h, pooled_w, batch_size, channels, heights, widths, sampling_ratio,
      aligned, canonical_scale, canonical_level, k_min, deterministic,
      [](int64_t n, const auto& f) { cpu_for_each(n, 64, f); },
      [](int64_t n, const auto& f) { cpu_for_each_serial(n, f); });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
  m.impl("multiscale_roi_align", &pyramid_forward);
  m.impl("_multiscale_roi_align_backward", &pyramid_backward);
}

TORCH_LIBRARY_IMPL(maskops_testing, CPU, m) {
  m.impl("_multiscale_roi_align_forward_elementwise", &forward_elementwise_cpu);
  m.impl("_multiscale_roi_align_backward_cuda_algo", &backward_cuda_algo_cpu);
}

}  // namespace roi_align
}  // namespace maskops
