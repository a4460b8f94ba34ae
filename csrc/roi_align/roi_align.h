// RoIAlign's per-element math, shared by roi_align_cpu.cpp and roi_align_cuda.cu.
//
// Coordinate convention (torchvision's, kept exactly): a box (x1, y1, x2, y2) in image pixels
// maps to feature coordinates by `* spatial_scale`; with `aligned` a further -0.5 shifts the
// box so that feature cell i is centred on i + 0.5 ("pixel model" of Detectron2). Without
// `aligned` the box is at least 1x1 feature cells. Each of the pooled_height x pooled_width
// bins averages grid_h x grid_w regularly spaced bilinear samples; grid = sampling_ratio, or
// ceil(box size / pooled size) when sampling_ratio <= 0. A sample beyond [-1, size] on either
// axis contributes zero (but still counts in the average); within [-1, 0] it is clamped to 0.
//
// Bilinear interpolation is separable, so a bin's value is
//   sum over row taps (y, wy) of sum over column taps (x, wx) of wy * wx * input[y, x]
// where the taps of one axis merge every sample that reads the same row (or column). The CPU
// path uses these merged taps (fewer reads, vectorised over channels); the CUDA path computes
// the same samples per output element. Both get their positions and weights from axis_tap().
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace maskops {
namespace roi_align {

// The adaptive sampling grid is capped: a bin more than this many feature cells tall is a
// degenerate box (or a NaN/inf one) and would otherwise cost unbounded time.
constexpr int kMaxAdaptiveGrid = 1024;
// The largest sampling_ratio a caller may give: the same cap. Beyond it the CPU taps tables
// (2 * sampling_ratio entries per output row / column) and the CUDA per-element sample loops
// (sampling_ratio**2) grow without changing the result, and grid_h * grid_w stays an int.
// maskops/_validate.py (MAX_SAMPLING_RATIO) checks the same limit for Python callers.
constexpr int kMaxSamplingRatio = kMaxAdaptiveGrid;

// One RoI in feature-map coordinates.
template <typename T>
struct RoiBox {
  int64_t batch;  // -1 when the batch index is not in [0, batch_size): contributes nothing
  T start_h, start_w;
  T bin_h, bin_w;
  int grid_h, grid_w;  // samples per bin along each axis; 0 means the bin is empty (output 0)
};

// Number of samples per bin along one axis. NaN, zero or negative extents give 0 samples.
template <typename T>
HOST_DEVICE inline int sample_grid(int64_t sampling_ratio, T extent, int64_t pooled) {
  if (sampling_ratio > 0) return static_cast<int>(sampling_ratio);
  const T q = extent / static_cast<T>(pooled);
  if (!(q > T(0))) return 0;  // NaN takes this branch
  if (q >= T(kMaxAdaptiveGrid)) return kMaxAdaptiveGrid;
  int g = static_cast<int>(q);
  if (static_cast<T>(g) < q) ++g;  // ceil
  return g;
}

// Reads one RoI row (batch_index, x1, y1, x2, y2).
template <typename T>
HOST_DEVICE inline RoiBox<T> roi_box(const T* roi, T spatial_scale, int64_t pooled_h,
                                     int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                     int64_t batch_size) {
  RoiBox<T> r;
  const T b = roi[0];
  // Range check written so that NaN takes the safe branch; truncation like torchvision.
  r.batch = (b >= T(0) && b < static_cast<T>(batch_size)) ? static_cast<int64_t>(b) : -1;
  const T offset = aligned ? T(0.5) : T(0);
  r.start_w = roi[1] * spatial_scale - offset;
  r.start_h = roi[2] * spatial_scale - offset;
  const T end_w = roi[3] * spatial_scale - offset;
  const T end_h = roi[4] * spatial_scale - offset;
  T w = end_w - r.start_w;
  T h = end_h - r.start_h;
  if (!aligned) {  // legacy mode: boxes are at least one feature cell (NaN stays NaN)
    if (w < T(1)) w = T(1);
    if (h < T(1)) h = T(1);
  }
  r.bin_h = h / static_cast<T>(pooled_h);
  r.bin_w = w / static_cast<T>(pooled_w);
  r.grid_h = sample_grid<T>(sampling_ratio, h, pooled_h);
  r.grid_w = sample_grid<T>(sampling_ratio, w, pooled_w);
  return r;
}

// Position of sample i (of grid) in the bin that starts at bin_start.
template <typename T>
HOST_DEVICE inline T sample_pos(T bin_start, T bin_size, int i, int grid) {
  return bin_start + static_cast<T>(i + .5f) * bin_size / static_cast<T>(grid);
}

// The two taps of one sample along one axis of length `size`.
template <typename T>
struct AxisTap {
  int64_t lo, hi;
  T w_lo, w_hi;
};

// Returns false when the sample lies outside [-1, size] (or is NaN): it contributes zero.
template <typename T>
HOST_DEVICE inline bool axis_tap(T pos, int64_t size, AxisTap<T>& t) {
  if (size <= 0 || !(pos >= T(-1) && pos <= static_cast<T>(size))) return false;
  if (pos <= T(0)) pos = T(0);
  int64_t lo = static_cast<int64_t>(pos);
  int64_t hi = lo + 1;
  if (lo >= size - 1) {  // at or past the last row: read it with full weight
    lo = hi = size - 1;
    pos = static_cast<T>(lo);
  }
  const T l = pos - static_cast<T>(lo);
  t.lo = lo;
  t.hi = hi;
  t.w_lo = T(1) - l;
  t.w_hi = l;
  return true;
}

// Adds (index, weight) to a tap list. Samples of a bin move monotonically, so for ordinary
// boxes a repeated index is one of the last two entries and is merged; inverted boxes (moving
// backwards) may leave a repeated index unmerged, which changes no sum.
template <typename T>
HOST_DEVICE inline int add_tap(int64_t* idx, T* w, int n, int64_t i, T wi) {
  if (n > 0 && idx[n - 1] == i) {
    w[n - 1] += wi;
    return n;
  }
  if (n > 1 && idx[n - 2] == i) {
    w[n - 2] += wi;
    return n;
  }
  idx[n] = i;
  w[n] = wi;
  return n + 1;
}

// The merged taps of one bin along one axis, each weight already divided by the grid size
// (so the product of a row and a column weight includes the 1 / count of the average).
// Writes at most 2 * grid entries and returns how many.
template <typename T>
HOST_DEVICE inline int bin_taps(T bin_start, T bin_size, int grid, int64_t size, int64_t* idx,
                                T* w) {
  int n = 0;
  if (grid <= 0) return 0;
  const T inv = T(1) / static_cast<T>(grid);
  for (int i = 0; i < grid; ++i) {
    AxisTap<T> t;
    if (!axis_tap(sample_pos(bin_start, bin_size, i, grid), size, t)) continue;
    n = add_tap(idx, w, n, t.lo, t.w_lo * inv);
    n = add_tap(idx, w, n, t.hi, t.w_hi * inv);
  }
  return n;
}

// The total weight that one bin gives to feature row (or column) `target` along one axis.
template <typename T>
HOST_DEVICE inline T bin_weight_at(T bin_start, T bin_size, int grid, int64_t size,
                                   int64_t target) {
  T acc = T(0);
  if (grid <= 0) return acc;
  const T inv = T(1) / static_cast<T>(grid);
  for (int i = 0; i < grid; ++i) {
    AxisTap<T> t;
    if (!axis_tap(sample_pos(bin_start, bin_size, i, grid), size, t)) continue;
    if (t.lo == target) acc += t.w_lo * inv;
    if (t.hi == target) acc += t.w_hi * inv;
  }
  return acc;
}

// ---- feature pyramids (multi-level RoIAlign; single-level RoIAlign is one level) ----

constexpr int kMaxLevels = 8;

HOST_DEVICE inline float log2_(float v) { return log2f(v); }
HOST_DEVICE inline double log2_(double v) { return log2(v); }
HOST_DEVICE inline float sqrt_(float v) { return sqrtf(v); }
HOST_DEVICE inline double sqrt_(double v) { return sqrt(v); }
HOST_DEVICE inline float floor_(float v) { return floorf(v); }
HOST_DEVICE inline double floor_(double v) { return floor(v); }

// torchvision's LevelMapper (FPN paper, eq. 1): a box of area A goes to pyramid level
//   k = floor(canonical_level + log2(sqrt(A) / canonical_scale) + 1e-6)
// clamped to the levels present, computed in the boxes' math type as torchvision does. Returns
// the index into the feature list, or -1 for a NaN level (an inverted box with negative area):
// torchvision assigns such a box to no level, so it pools to zeros.
template <typename T>
struct LevelMap {
  int num_levels;  // 1: every RoI reads features[0], whatever its size
  int k_min;       // pyramid level of features[0] (2 for stride 4)
  T canonical_scale, canonical_level;

  HOST_DEVICE int operator()(const T* roi) const {
    if (num_levels <= 1) return 0;
    const T area = (roi[3] - roi[1]) * (roi[4] - roi[2]);
    const T k = floor_(canonical_level + log2_(sqrt_(area) / canonical_scale) + T(1e-6));
    if (!(k == k)) return -1;
    const T lo = static_cast<T>(k_min), hi = static_cast<T>(k_min + num_levels - 1);
    return static_cast<int>(k < lo ? lo : (k > hi ? hi : k)) - k_min;
  }
};

// Sizes shared by every RoIAlign kernel, with the per-level map sizes and scales.
template <typename T>
struct Params {
  int num_levels;
  int64_t height[kMaxLevels], width[kMaxLevels];
  T spatial_scale[kMaxLevels];
  LevelMap<T> level_of;
  int64_t batch_size, channels, pooled_h, pooled_w, num_rois, sampling_ratio;
  bool aligned;

  HOST_DEVICE RoiBox<T> box(const T* rois, int64_t k, int level) const {
    return roi_box(rois + 5 * k, spatial_scale[level], pooled_h, pooled_w, sampling_ratio, aligned,
                   batch_size);
  }
};

// Where one level's tensor lives: data pointer and element strides of [N, C, H, W].
template <typename scalar_t>
struct LevelData {
  scalar_t* data;
  int64_t s_n, s_c, s_h, s_w;
};

// CUDA forward: one output element per iteration, index i in the output's memory order
// ([K, C, PH, PW], or [K, PH, PW, C] when channels_last). Reads features through their
// strides, so any layout works without a copy.
template <typename scalar_t, typename T>
struct ForwardElement {
  Params<T> p;
  LevelData<const scalar_t> level[kMaxLevels];
  const T* rois;  // [K, 5], contiguous, in the math type T
  scalar_t* output;
  bool channels_last;

  HOST_DEVICE void operator()(int64_t i) const {
    int64_t c, ph, pw, k, r;
    if (channels_last) {
      c = i % p.channels;
      r = i / p.channels;
      pw = r % p.pooled_w;
      r /= p.pooled_w;
      ph = r % p.pooled_h;
      k = r / p.pooled_h;
    } else {
      pw = i % p.pooled_w;
      r = i / p.pooled_w;
      ph = r % p.pooled_h;
      r /= p.pooled_h;
      c = r % p.channels;
      k = r / p.channels;
    }
    const int l = p.level_of(rois + 5 * k);
    T sum = T(0);
    if (l >= 0) {
      const RoiBox<T> b = p.box(rois, k, l);
      if (b.batch >= 0 && b.grid_h > 0 && b.grid_w > 0) {
        const LevelData<const scalar_t>& f = level[l];
        const scalar_t* plane = f.data + b.batch * f.s_n + c * f.s_c;
        const T y0 = b.start_h + static_cast<T>(ph) * b.bin_h;
        const T x0 = b.start_w + static_cast<T>(pw) * b.bin_w;
        for (int iy = 0; iy < b.grid_h; ++iy) {
          AxisTap<T> ty;
          if (!axis_tap(sample_pos(y0, b.bin_h, iy, b.grid_h), p.height[l], ty)) continue;
          const scalar_t* row_lo = plane + ty.lo * f.s_h;
          const scalar_t* row_hi = plane + ty.hi * f.s_h;
          for (int ix = 0; ix < b.grid_w; ++ix) {
            AxisTap<T> tx;
            if (!axis_tap(sample_pos(x0, b.bin_w, ix, b.grid_w), p.width[l], tx)) continue;
            const T top = tx.w_lo * static_cast<T>(row_lo[tx.lo * f.s_w]) +
                          tx.w_hi * static_cast<T>(row_lo[tx.hi * f.s_w]);
            const T bottom = tx.w_lo * static_cast<T>(row_hi[tx.lo * f.s_w]) +
                             tx.w_hi * static_cast<T>(row_hi[tx.hi * f.s_w]);
            sum += ty.w_lo * top + ty.w_hi * bottom;
          }
        }
        sum /= static_cast<T>(b.grid_h * b.grid_w);
      }
    }
    output[i] = static_cast<scalar_t>(sum);
  }
};

// Element offset of grad_output[k, c, ph, pw] for a tensor with strides k, c, h, w.
struct GradStrides {
  int64_t k, c, h, w;
  HOST_DEVICE int64_t at(int64_t kk, int64_t cc, int64_t hh, int64_t ww) const {
    return kk * k + cc * c + hh * h + ww * w;
  }
};

// CUDA backward (default, fast): one grad_output element per iteration (in [K, C, PH, PW]
// order), scattered into per-level [N, C, H, W] accumulators of type T (any strides: the
// output's layout) with maskops::accumulate (atomic on the GPU).
template <typename scalar_t, typename T>
struct BackwardScatter {
  Params<T> p;
  const scalar_t* grad;
  GradStrides gs;
  const T* rois;
  LevelData<T> grad_input[kMaxLevels];

  HOST_DEVICE void operator()(int64_t i) const {
    const int64_t pw = i % p.pooled_w;
    int64_t r = i / p.pooled_w;
    const int64_t ph = r % p.pooled_h;
    r /= p.pooled_h;
    const int64_t c = r % p.channels;
    const int64_t k = r / p.channels;
    const int l = p.level_of(rois + 5 * k);
    if (l < 0) return;
    const RoiBox<T> b = p.box(rois, k, l);
    if (b.batch < 0 || b.grid_h <= 0 || b.grid_w <= 0) return;
    const int64_t H = p.height[l], W = p.width[l];
    const T g = static_cast<T>(grad[gs.at(k, c, ph, pw)]) / static_cast<T>(b.grid_h * b.grid_w);
    const LevelData<T>& gi = grad_input[l];
    T* plane = gi.data + b.batch * gi.s_n + c * gi.s_c;
    const T y0 = b.start_h + static_cast<T>(ph) * b.bin_h;
    const T x0 = b.start_w + static_cast<T>(pw) * b.bin_w;
    for (int iy = 0; iy < b.grid_h; ++iy) {
      AxisTap<T> ty;
      if (!axis_tap(sample_pos(y0, b.bin_h, iy, b.grid_h), H, ty)) continue;
      T* row_lo = plane + ty.lo * gi.s_h;
      T* row_hi = plane + ty.hi * gi.s_h;
      for (int ix = 0; ix < b.grid_w; ++ix) {
        AxisTap<T> tx;
        if (!axis_tap(sample_pos(x0, b.bin_w, ix, b.grid_w), W, tx)) continue;
        accumulate(row_lo + tx.lo * gi.s_w, g * ty.w_lo * tx.w_lo);
        accumulate(row_lo + tx.hi * gi.s_w, g * ty.w_lo * tx.w_hi);
        accumulate(row_hi + tx.lo * gi.s_w, g * ty.w_hi * tx.w_lo);
        accumulate(row_hi + tx.hi * gi.s_w, g * ty.w_hi * tx.w_hi);
      }
    }
  }
};

// CUDA backward, deterministic mode, first pass: the (level, image) group of each RoI,
// level * batch_size + image, or num_levels * batch_size for an RoI that gives nothing (no
// level, a batch index out of range, an empty sampling grid). Sorted stably, the groups let
// each gradient element visit only the RoIs of its own level and image.
template <typename T>
struct RoiGroupKey {
  Params<T> p;
  const T* rois;
  int64_t* key;

  HOST_DEVICE void operator()(int64_t k) const {
    const int64_t none = p.num_levels * p.batch_size;
    const int l = p.level_of(rois + 5 * k);
    if (l < 0) {
      key[k] = none;
      return;
    }
    const RoiBox<T> b = p.box(rois, k, l);
    key[k] = (b.batch < 0 || b.grid_h <= 0 || b.grid_w <= 0) ? none : l * p.batch_size + b.batch;
  }
};

// ---- deterministic backward: a gather, one writer per gradient element ----
//
// Each spatial position (level, image, y, x) of the pyramid is one iteration that computes
// the gradient of all its channels, adding what each RoI gives it in a fixed order (RoI index,
// then bin row, then bin column): no atomics, the same bits on every run. The geometry is
// worked out once, before the gather:
//   1. RoiGeometry, per RoI: its level and box, and, along each axis, the span of feature
//      indices each bin's samples read (its taps) and their union, the RoI's reach;
//   2. RoiGroupKey and a stable sort: the RoIs of each (level, image) group, in index order;
//   3. TileRoiMask, per tile x tile cells of each (level, image): a bit per RoI of the group
//      whose reach touches the tile.
// A position then visits only the RoIs of its tile's bits, and of those only the bins whose
// spans hold it; the weights of one position are found once for all its channels.

// Side of a tile, in feature cells; larger when the tiles' masks would take more than
// kMaxTileWords words (a mask has a word per 64 RoIs of the whole batch: a bound on any group).
constexpr int64_t kTile = 16;
constexpr int64_t kMaxTileWords = int64_t(1) << 22;

// Sentinel spans: lo > hi means "reads nothing".
constexpr int32_t kNoSpanLo = 0x7fffffff;
constexpr int32_t kNoSpanHi = -1;

// What the gather needs of one RoI, computed once.
template <typename T>
struct RoiGeom {
  RoiBox<T> b;
  int32_t level;                   // -1: gives nothing
  int32_t y_lo, y_hi, x_lo, x_hi;  // the reach: feature rows and columns any of its taps read
};

// The span [lo, hi] of feature indices the taps of one bin read along one axis (lo > hi when
// none of its samples lies within the map).
template <typename T>
HOST_DEVICE inline void bin_span(T bin_start, T bin_size, int grid, int64_t size, int32_t& lo,
                                 int32_t& hi) {
  lo = kNoSpanLo;
  hi = kNoSpanHi;
  for (int i = 0; i < grid; ++i) {
    AxisTap<T> t;
    if (!axis_tap(sample_pos(bin_start, bin_size, i, grid), size, t)) continue;
    if (t.lo < lo) lo = static_cast<int32_t>(t.lo);
    if (t.hi > hi) hi = static_cast<int32_t>(t.hi);
  }
}

// Deterministic backward, pass 1 (one RoI per iteration): geom[k], and spans[k] = the spans
// of its PH bin rows then PW bin columns, (lo, hi) pairs.
template <typename T>
struct RoiGeometry {
  Params<T> p;
  const T* rois;
  RoiGeom<T>* geom;
  int32_t* spans;  // [K, PH + PW, 2]

  HOST_DEVICE void operator()(int64_t k) const {
    RoiGeom<T> g{};
    g.y_lo = g.x_lo = kNoSpanLo;
    g.y_hi = g.x_hi = kNoSpanHi;
    int32_t* sp = spans + 2 * k * (p.pooled_h + p.pooled_w);
    for (int64_t s = 0; s < p.pooled_h + p.pooled_w; ++s) {
      sp[2 * s] = kNoSpanLo;
      sp[2 * s + 1] = kNoSpanHi;
    }
    g.level = p.level_of(rois + 5 * k);
    if (g.level >= 0) g.b = p.box(rois, k, g.level);
    if (g.level < 0 || g.b.batch < 0 || g.b.grid_h <= 0 || g.b.grid_w <= 0) {
      g.level = -1;
      geom[k] = g;
      return;
    }
    const RoiBox<T>& b = g.b;
    for (int64_t ph = 0; ph < p.pooled_h; ++ph) {
      int32_t* s = sp + 2 * ph;
      bin_span(b.start_h + static_cast<T>(ph) * b.bin_h, b.bin_h, b.grid_h, p.height[g.level], s[0],
               s[1]);
      if (s[0] < g.y_lo) g.y_lo = s[0];
      if (s[1] > g.y_hi) g.y_hi = s[1];
    }
    for (int64_t pw = 0; pw < p.pooled_w; ++pw) {
      int32_t* s = sp + 2 * (p.pooled_h + pw);
      bin_span(b.start_w + static_cast<T>(pw) * b.bin_w, b.bin_w, b.grid_w, p.width[g.level], s[0],
               s[1]);
      if (s[0] < g.x_lo) g.x_lo = s[0];
      if (s[1] > g.x_hi) g.x_hi = s[1];
    }
    geom[k] = g;
  }
};

// Where the gather's tiles and positions are: per level, the tiles of one image along each
// axis, and the first tile and first position of the level (all images), plus the ends.
struct TileLayout {
  int num_levels;
  int64_t batch_size;
  int64_t side;  // of a tile, in feature cells
  int64_t tiles_h[kMaxLevels], tiles_w[kMaxLevels];
  int64_t tile_offset[kMaxLevels + 1];      // first tile of each level
  int64_t position_offset[kMaxLevels + 1];  // first spatial position of each level
  int64_t words_per_tile;                   // mask words of a tile: ceil(num_rois / 64)

  // The level of a spatial position (positions of all levels laid end to end).
  HOST_DEVICE int level_of_position(int64_t i) const {
    int l = 0;
    while (l + 1 < num_levels && i >= position_offset[l + 1]) ++l;
    return l;
  }
  HOST_DEVICE int level_of_tile(int64_t t) const {
    int l = 0;
    while (l + 1 < num_levels && t >= tile_offset[l + 1]) ++l;
    return l;
  }
  HOST_DEVICE int64_t tile(int l, int64_t n, int64_t y, int64_t x) const {
    return tile_offset[l] + (n * tiles_h[l] + y / side) * tiles_w[l] + x / side;
  }
};

// Deterministic backward, pass 3 (one mask word per iteration): bit b of word w of tile t is
// set when RoI roi_order[group_start[g] + 64 w + b] of the tile's (level, image) group g
// reaches the tile. Words past the group's end are never read and not written.
template <typename T>
struct TileRoiMask {
  TileLayout t;
  const RoiGeom<T>* geom;
  const int64_t* roi_order;
  const int64_t* group_start;
  uint64_t* mask;  // [tiles, words_per_tile]

  HOST_DEVICE void operator()(int64_t i) const {
    const int64_t tile = i / t.words_per_tile, w = i % t.words_per_tile;
    const int l = t.level_of_tile(tile);
    const int64_t r = tile - t.tile_offset[l];
    const int64_t tx = r % t.tiles_w[l], ty = (r / t.tiles_w[l]) % t.tiles_h[l];
    const int64_t n = r / (t.tiles_w[l] * t.tiles_h[l]);
    const int64_t g = l * t.batch_size + n;
    const int64_t first = group_start[g] + 64 * w, end = group_start[g + 1];
    if (first >= end) return;
    const int64_t y0 = ty * t.side, y1 = y0 + t.side - 1, x0 = tx * t.side, x1 = x0 + t.side - 1;
    uint64_t bits = 0;
    for (int b = 0; b < 64 && first + b < end; ++b) {
      const RoiGeom<T>& gk = geom[roi_order[first + b]];
      if (gk.y_lo <= y1 && gk.y_hi >= y0 && gk.x_lo <= x1 && gk.x_hi >= x0)
        bits |= uint64_t(1) << b;
    }
    mask[i] = bits;
  }
};

// Deterministic backward, the gather (one spatial position per iteration, all channels).
// The (grad offset, weight) terms of a position are collected kTerms at a time; each batch of
// terms is then applied to every channel, continuing the channel's sum from memory after the
// first batch, so every element's sum runs over the terms in the same order as one pass would.
template <typename scalar_t, typename T>
struct BackwardGather {
  static constexpr int kTerms = 32;
  Params<T> p;
  const scalar_t* grad;
  GradStrides gs;
  LevelData<T> grad_input[kMaxLevels];  // [N, C, H, W] per level, any strides
  TileLayout t;
  const RoiGeom<T>* geom;
  const int32_t* spans;
  const int64_t* roi_order;    // RoI indices sorted stably by RoiGroupKey
  const int64_t* group_start;  // group g's RoIs are roi_order[group_start[g] .. group_start[g + 1])
  const uint64_t* tile_mask;   // TileRoiMask

  // out[c * s_c] (one per channel) op= the terms' weighted grads.
  HOST_DEVICE void apply(T* out, int64_t s_c, const int64_t* off, const T* w, int nt,
                         bool first) const {
    for (int64_t c = 0; c < p.channels; ++c) {
      T acc = first ? T(0) : out[c * s_c];
      for (int e = 0; e < nt; ++e) acc += w[e] * static_cast<T>(grad[off[e] + c * gs.c]);
      out[c * s_c] = acc;
    }
  }

  HOST_DEVICE void operator()(int64_t i) const {
    const int l = t.level_of_position(i);
    const int64_t H = p.height[l], W = p.width[l];
    const int64_t j = i - t.position_offset[l];
    const int64_t x = j % W;
    const int64_t y = (j / W) % H;
    const int64_t n = j / (W * H);
    const LevelData<T>& gi = grad_input[l];
    T* out = gi.data + n * gi.s_n + y * gi.s_h + x * gi.s_w;
    int64_t off[kTerms];
    T w[kTerms];
    int nt = 0;
    bool first = true;
    const int64_t g = l * p.batch_size + n;
    const int64_t begin = group_start[g], end = group_start[g + 1];
    const uint64_t* words = tile_mask + t.tile(l, n, y, x) * t.words_per_tile;
    const int64_t yy = y, xx = x;
    for (int64_t wi = 0; begin + 64 * wi < end; ++wi) {
      for (uint64_t bits = words[wi]; bits != 0; bits &= bits - 1) {
        const int64_t k = roi_order[begin + 64 * wi + lowest_bit(bits)];
        const RoiGeom<T>& gk = geom[k];
        if (yy < gk.y_lo || yy > gk.y_hi || xx < gk.x_lo || xx > gk.x_hi) continue;
        const RoiBox<T>& b = gk.b;
        const int32_t* sp = spans + 2 * k * (p.pooled_h + p.pooled_w);
        for (int64_t ph = 0; ph < p.pooled_h; ++ph) {
          if (yy < sp[2 * ph] || yy > sp[2 * ph + 1]) continue;
          const T y0 = b.start_h + static_cast<T>(ph) * b.bin_h;
          const T wy = bin_weight_at(y0, b.bin_h, b.grid_h, H, y);
          if (wy == T(0)) continue;
          for (int64_t pw = 0; pw < p.pooled_w; ++pw) {
            const int32_t* sx = sp + 2 * (p.pooled_h + pw);
            if (xx < sx[0] || xx > sx[1]) continue;
            const T x0 = b.start_w + static_cast<T>(pw) * b.bin_w;
            const T wx = bin_weight_at(x0, b.bin_w, b.grid_w, W, x);
            if (wx == T(0)) continue;
            off[nt] = gs.at(k, 0, ph, pw);
            w[nt] = wy * wx;
            if (++nt == kTerms) {
              apply(out, gi.s_c, off, w, nt, first);
              first = false;
              nt = 0;
            }
          }
        }
      }
    }
    if (nt > 0 || first) apply(out, gi.s_c, off, w, nt, first);
  }
};

}  // namespace roi_align
}  // namespace maskops
