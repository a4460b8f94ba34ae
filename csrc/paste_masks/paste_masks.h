// Mask paste's per-element math, shared by paste_masks_cpu.cpp and paste_masks_cuda.cu.
//
// Each M x M mask is padded by `padding` zero cells on every side, its box is grown by the
// same factor (M + 2 * padding) / M about its centre and truncated to whole pixels, and the
// padded mask is resized bilinearly (half-pixel centres, as F.interpolate with
// align_corners=False) onto that pixel box, clipped to the image. This is exactly Mask
// R-CNN's paste_masks_in_image as torchvision implements it, fused: no padded copy, no
// resized intermediate, only the pixels inside each box are computed.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace maskops {
namespace paste_masks {

// The pixel box a mask is pasted into: rows [y0, y1] and columns [x0, x1], inclusive, in
// image pixels (may extend past the image), and the resized mask's size (h, w).
struct PixelBox {
  int64_t x0, y0, x1, y1;
  int64_t w, h;
};

// Truncation toward zero, as Tensor.to(torch.int64); the range check keeps NaN and huge
// coordinates defined (they then paste nothing).
template <typename T>
HOST_DEVICE inline int64_t to_int64(T v) {
  const T lim = static_cast<T>(4.0e18);
  if (!(v > -lim && v < lim)) return v > T(0) ? INT64_MAX / 4 : INT64_MIN / 4;
  return static_cast<int64_t>(v);
}

// Grows box (x1, y1, x2, y2) by `scale` about its centre, in T arithmetic in torchvision's
// order of operations, then truncates to pixels.
template <typename T>
HOST_DEVICE inline PixelBox pixel_box(const T* box, T scale) {
  const T w_half = (box[2] - box[0]) * T(0.5) * scale;
  const T h_half = (box[3] - box[1]) * T(0.5) * scale;
  const T x_c = (box[2] + box[0]) * T(0.5);
  const T y_c = (box[3] + box[1]) * T(0.5);
  PixelBox b;
  b.x0 = to_int64(x_c - w_half);
  b.x1 = to_int64(x_c + w_half);
  b.y0 = to_int64(y_c - h_half);
  b.y1 = to_int64(y_c + h_half);
  b.w = b.x1 - b.x0 + 1;
  b.h = b.y1 - b.y0 + 1;
  if (b.w < 1) b.w = 1;
  if (b.h < 1) b.h = 1;
  return b;
}

// The image pixels [lo, hi) that a box covers along one axis of length `size` (empty when
// hi <= lo).
HOST_DEVICE inline void clip_span(int64_t first, int64_t last, int64_t size, int64_t& lo,
                                  int64_t& hi) {
  lo = first > 0 ? first : 0;
  hi = last + 1 < size ? last + 1 : size;
}

// Linear interpolation taps of output index `dst` when resizing `in_size` cells to
// `out_size` (align_corners=False), as ATen's upsample kernels compute them: source
// position scale * (dst + 0.5) - 0.5 clamped at 0, taps floor and floor + 1 (clamped).
template <typename T>
struct ResizeTap {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
HOST_DEVICE inline T resize_scale(int64_t in_size, int64_t out_size) {
  return static_cast<T>(in_size) / static_cast<T>(out_size);
}

template <typename T>
HOST_DEVICE inline ResizeTap<T> resize_tap(int64_t dst, T scale, int64_t in_size) {
  T src = scale * (static_cast<T>(dst) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  T l = src - static_cast<T>(i0);
  if (l < T(0)) l = T(0);
  if (l > T(1)) l = T(1);
  ResizeTap<T> t;
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.w0 = T(1) - l;
  t.w1 = l;
  return t;
}

// A cell of the zero-padded mask: padded index r maps to mask row r - padding.
template <typename scalar_t, typename T>
HOST_DEVICE inline T padded_cell(const scalar_t* mask, int64_t M, int64_t padding, int64_t r,
                                 int64_t c) {
  r -= padding;
  c -= padding;
  if (r < 0 || r >= M || c < 0 || c >= M) return T(0);
  return static_cast<T>(mask[r * M + c]);
}

// The resized padded mask at (row, col) of the box's h x w grid: rows first, as ATen sums.
template <typename scalar_t, typename T>
HOST_DEVICE inline T resized_value(const scalar_t* mask, int64_t M, int64_t padding,
                                   const ResizeTap<T>& ty, const ResizeTap<T>& tx) {
  const T top = padded_cell<scalar_t, T>(mask, M, padding, ty.i0, tx.i0) * tx.w0 +
                padded_cell<scalar_t, T>(mask, M, padding, ty.i0, tx.i1) * tx.w1;
  const T bottom = padded_cell<scalar_t, T>(mask, M, padding, ty.i1, tx.i0) * tx.w0 +
                   padded_cell<scalar_t, T>(mask, M, padding, ty.i1, tx.i1) * tx.w1;
  return top * ty.w0 + bottom * ty.w1;
}

// Shared sizes of every paste kernel.
template <typename T>
struct Params {
  int64_t num_masks, channels, mask_size, padding, height, width;
  T box_scale;      // (M + 2 * padding) / M, in the box math type
  float threshold;  // used by thresholded outputs
};

template <typename box_t>
inline Params<box_t> make_params(int64_t num_masks, int64_t channels, int64_t mask_size,
                                 int64_t padding, int64_t height, int64_t width, double threshold) {
  Params<box_t> p;
  p.num_masks = num_masks;
  p.channels = channels;
  p.mask_size = mask_size;
  p.padding = padding;
  p.height = height;
  p.width = width;
  // torchvision's scale is a Python float applied to float32 boxes, i.e. rounded to box_t.
  p.box_scale = static_cast<box_t>(static_cast<double>(mask_size + 2 * padding) /
                                   static_cast<double>(mask_size));
  p.threshold = static_cast<float>(threshold);
  return p;
}

// ---- The CUDA kernel's loop ----
//
// A block of threads owns a tile of kTilePixels consecutive pixels of one (mask, channel)
// plane of the output [N, C, H, W]. One thread reads the mask's box and works out its
// geometry (PlaneGeometry: the pixel box, its clipped spans, the resize scales) once for the
// block; then the block's threads stride over the tile's pixels, each writing zero outside
// the box and the resized mask value (or value >= threshold) inside. So the box math and the
// divisions are paid per block, the per-pixel work is two resize taps and four mask reads,
// and one coalesced pass writes every byte of the output, zeros included.

constexpr int kPasteThreads = 256;     // threads per block
constexpr int64_t kTilePixels = 4096;  // pixels per block (16 per thread)

// What a block knows of its mask once the box is read: the pixel box's first row and column
// (may lie outside the image), the image rows [ylo, yhi) and columns [xlo, xhi) it covers
// (empty when hi == lo; both clamped to the image, so they fit index_t), and the resize
// scales (M + 2 * padding) / h and / w.
template <typename index_t, typename T>
struct PlaneGeometry {
  int64_t y0, x0;
  index_t ylo, yhi, xlo, xhi;
  T sy, sx;
};

// Whether 32-bit indices cover every index the kernel forms: output and mask offsets, and a
// thread's position past the end of its tile. Decided once on the host.
inline bool fits_int32(int64_t out_numel, int64_t masks_numel) {
  const int64_t lim = static_cast<int64_t>(INT32_MAX) - kTilePixels - kPasteThreads;
  return out_numel <= lim && masks_numel <= lim;
}

// The tiles of an output: tiles_per_plane tiles of kTilePixels (the last one of each plane
// shorter) for each of the N * C planes.
inline int64_t tiles_per_plane(int64_t height, int64_t width) {
  return (height * width + kTilePixels - 1) / kTilePixels;
}

template <typename index_t, typename scalar_t, typename T, typename box_t, typename out_t>
struct PasteTiles {
  Params<box_t> p;
  const scalar_t* masks;  // [N, C, M, M] contiguous
  const box_t* boxes;     // [N, 4] contiguous
  out_t* out;             // [N, C, H, W] contiguous
  index_t tiles;          // tiles per plane
  bool thresholded;

  // The geometry of tile b's mask (computed by one thread of the block).
  HOST_DEVICE PlaneGeometry<index_t, T> geometry(index_t b) const {
    const index_t n = b / tiles / static_cast<index_t>(p.channels);
    const PixelBox pb = pixel_box(boxes + 4 * static_cast<int64_t>(n), p.box_scale);
    int64_t lo, hi;
    PlaneGeometry<index_t, T> g;
    g.y0 = pb.y0;
    g.x0 = pb.x0;
    clip_span(pb.y0, pb.y1, p.height, lo, hi);
    lo = lo < p.height ? lo : p.height;
    g.ylo = static_cast<index_t>(lo);
    g.yhi = static_cast<index_t>(hi > lo ? hi : lo);
    clip_span(pb.x0, pb.x1, p.width, lo, hi);
    lo = lo < p.width ? lo : p.width;
    g.xlo = static_cast<index_t>(lo);
    g.xhi = static_cast<index_t>(hi > lo ? hi : lo);
    const int64_t S = p.mask_size + 2 * p.padding;
    g.sy = resize_scale<T>(S, pb.h);
    g.sx = resize_scale<T>(S, pb.w);
    return g;
  }

  // Thread t of the block's `threads`: pixels t, t + threads, ... of tile b. The pixel's
  // (row, column) advances by (threads / W, threads % W) with a carry: no division per pixel.
  HOST_DEVICE void pixels(index_t b, const PlaneGeometry<index_t, T>& g, index_t t,
                          index_t threads) const {
    const index_t W = static_cast<index_t>(p.width), H = static_cast<index_t>(p.height);
    const index_t M = static_cast<index_t>(p.mask_size);
    const index_t plane = b / tiles;
    const index_t first = (b - plane * tiles) * static_cast<index_t>(kTilePixels);
    const index_t plane_pixels = H * W;
    const index_t count = plane_pixels - first < static_cast<index_t>(kTilePixels)
                              ? plane_pixels - first
                              : static_cast<index_t>(kTilePixels);
    out_t* o = out + plane * plane_pixels + first;
    const scalar_t* m = masks + plane * M * M;
    // Rows [first / W, (first + count - 1) / W] of the plane: when none is in the box (most
    // tiles of a small box), the tile is all zeros.
    if (g.xlo == g.xhi || (first + count - 1) / W < g.ylo || first / W >= g.yhi) {
      for (index_t k = t; k < count; k += threads) o[k] = out_t(0);
      return;
    }
    const int64_t S = p.mask_size + 2 * p.padding;
    const T thr = static_cast<T>(p.threshold);
    index_t y = (first + t) / W, x = (first + t) - y * W;
    const index_t dy = threads / W, dx = threads - dy * W;
    for (index_t k = t; k < count; k += threads) {
      T v = T(0);
      if (y >= g.ylo && y < g.yhi && x >= g.xlo && x < g.xhi) {
        const ResizeTap<T> ty = resize_tap(static_cast<int64_t>(y) - g.y0, g.sy, S);
        const ResizeTap<T> tx = resize_tap(static_cast<int64_t>(x) - g.x0, g.sx, S);
        v = resized_value<scalar_t, T>(m, p.mask_size, p.padding, ty, tx);
      }
      o[k] = thresholded ? static_cast<out_t>(v >= thr) : static_cast<out_t>(v);
      x += dx;
      y += dy;
      if (x >= W) {
        x -= W;
        ++y;
      }
    }
  }
};

// What one block does for tile b: thread 0 computes the geometry into `g` (shared memory on
// the GPU), sync() is a barrier, then threads [t0, t1) of the block's `threads` write their
// pixels. On the GPU each thread runs it with t1 = t0 + 1 and __syncthreads() as sync(); the
// CPU test op runs each tile on one host thread with t0 = 0, t1 = threads: the same
// pixel-to-thread mapping, one simulated thread after another, with no barrier needed.
template <typename F, typename G, typename index_t, typename Sync>
HOST_DEVICE inline void paste_tile(const F& f, index_t b, index_t t0, index_t t1, index_t threads,
                                   G& g, const Sync& sync) {
  if (t0 == 0) g = f.geometry(b);
  sync();
  for (index_t t = t0; t < t1; ++t) f.pixels(b, g, t, threads);
}

// A barrier for a block run by a single host thread.
struct NoSync {
  HOST_DEVICE void operator()() const {}
};

}  // namespace paste_masks
}  // namespace maskops
