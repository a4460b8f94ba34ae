// Mask paste on the CPU, and COCO RLE encoding of pasted masks.
//
// Paste: the work is split by output rows ([N, C, H] rows of W pixels), so threads write
// (and first touch) disjoint memory and boxes of any size balance well. Per mask the padded
// mask, its box and the column taps are prepared once; each row then zero-fills outside the
// box and interpolates inside it with the same arithmetic as the CUDA kernel's PasteTiles.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_allocator.h"
#include "paste_masks/paste_masks.h"
#include "paste_masks/paste_masks_args.h"

namespace maskops {
namespace paste_masks {
namespace {

at::ScalarType out_type(const at::Tensor& masks, bool thresholded, bool as_uint8) {
  if (!thresholded) return masks.scalar_type();
  return as_uint8 ? at::kByte : at::kBool;
}

template <typename scalar_t, typename T, typename box_t, typename out_t>
void paste_rows(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out,
                const Params<box_t>& p, bool thresholded) {
  const int64_t N = p.num_masks, C = p.channels, M = p.mask_size, H = p.height, W = p.width;
  const int64_t S = M + 2 * p.padding;
  const box_t* bp = boxes.data_ptr<box_t>();
  const scalar_t* mp = masks.data_ptr<scalar_t>();
  out_t* op = out.data_ptr<out_t>();
  // Per mask: its pixel box, clipped spans, and the row and column taps inside them.
  std::vector<PixelBox> pb(N);
  std::vector<int64_t> ylo(N), yhi(N), xlo(N), xhi(N), yoff(N + 1, 0), xoff(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    pb[n] = pixel_box(bp + 4 * n, p.box_scale);
    clip_span(pb[n].y0, pb[n].y1, H, ylo[n], yhi[n]);
    clip_span(pb[n].x0, pb[n].x1, W, xlo[n], xhi[n]);
    yoff[n + 1] = yoff[n] + std::max<int64_t>(yhi[n] - ylo[n], 0);
    xoff[n + 1] = xoff[n] + std::max<int64_t>(xhi[n] - xlo[n], 0);
  }
  std::vector<ResizeTap<T>> ytap(yoff[N]);
  std::vector<int64_t> xi0(xoff[N]), xi1(xoff[N]);
  std::vector<T> xw0(xoff[N]), xw1(xoff[N]);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T sy = resize_scale<T>(S, pb[n].h), sx = resize_scale<T>(S, pb[n].w);
      for (int64_t y = ylo[n]; y < yhi[n]; ++y)
        ytap[yoff[n] + y - ylo[n]] = resize_tap(y - pb[n].y0, sy, S);
      for (int64_t x = xlo[n]; x < xhi[n]; ++x) {
        const ResizeTap<T> t = resize_tap(x - pb[n].x0, sx, S);
        const int64_t j = xoff[n] + x - xlo[n];
        xi0[j] = t.i0;
        xi1[j] = t.i1;
        xw0[j] = t.w0;
        xw1[j] = t.w1;
      }
    }
  });
  // The padded masks in T, so the inner loop needs no bounds checks.
  std::vector<T> padded(N * C * S * S, T(0));
  at::parallel_for(0, N * C, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t c = 0; c < M; ++c)
          padded[(m * S + r + p.padding) * S + c + p.padding] =
              static_cast<T>(mp[(m * M + r) * M + c]);
  });
  const T thr = static_cast<T>(p.threshold);
  at::parallel_for(0, N * C * H, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t y = row % H, m = row / H, n = m / C;
      out_t* o = op + row * W;
      if (y < ylo[n] || y >= yhi[n] || xhi[n] <= xlo[n]) {
        std::memset(o, 0, W * sizeof(out_t));
        continue;
      }
      std::memset(o, 0, xlo[n] * sizeof(out_t));
      std::memset(o + xhi[n], 0, (W - xhi[n]) * sizeof(out_t));
      const ResizeTap<T>& ty = ytap[yoff[n] + y - ylo[n]];
      const T* row0 = padded.data() + (m * S + ty.i0) * S;
      const T* row1 = padded.data() + (m * S + ty.i1) * S;
      const int64_t base = xoff[n] - xlo[n];
      for (int64_t x = xlo[n]; x < xhi[n]; ++x) {
        const int64_t j = base + x;
        // The order of operations of resized_value() (and of ATen's bilinear upsample).
        const T top = row0[xi0[j]] * xw0[j] + row0[xi1[j]] * xw1[j];
        const T bottom = row1[xi0[j]] * xw0[j] + row1[xi1[j]] * xw1[j];
        const T v = top * ty.w0 + bottom * ty.w1;
        o[x] = thresholded ? static_cast<out_t>(v >= thr) : static_cast<out_t>(v);
      }
    }
  });
}

// Runs `body<scalar_t, T, box_t, out_t>` for the tensors' dtypes.
template <template <typename, typename, typename, typename> class Body>
void dispatch(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
              double threshold, bool thresholded, bool index64) {
  const int64_t H = out.size(2), W = out.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, masks.scalar_type(), "paste_masks", [&] {
        using T = at::opmath_type<scalar_t>;
        using mask_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "paste_masks_boxes", [&] {
          using box_t = scalar_t;
          const auto p = make_params<box_t>(masks.size(0), masks.size(1), masks.size(2), padding, H,
                                            W, threshold);
          if (!thresholded) {
            Body<mask_t, T, box_t, mask_t>::run(masks, boxes, out, p, false, index64);
          } else if (out.scalar_type() == at::kBool) {
            Body<mask_t, T, box_t, bool>::run(masks, boxes, out, p, true, index64);
          } else {
            Body<mask_t, T, box_t, uint8_t>::run(masks, boxes, out, p, true, index64);
          }
        });
      });
}

template <typename scalar_t, typename T, typename box_t, typename out_t>
struct RowBody {
  static void run(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out,
                  const Params<box_t>& p, bool thresholded, bool /*index64*/) {
    paste_rows<scalar_t, T, box_t, out_t>(masks, boxes, out, p, thresholded);
  }
};

// The CUDA kernel's tiles on the host: each tile (one host thread) runs paste_tile(), the
// block's loop, for all kPasteThreads of the block in turn.
template <typename index_t, typename scalar_t, typename T, typename box_t, typename out_t>
void paste_tiles(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out,
                 const Params<box_t>& p, bool thresholded) {
  const int64_t tiles = tiles_per_plane(p.height, p.width);
  const PasteTiles<index_t, scalar_t, T, box_t, out_t> f{p,
                                                         masks.data_ptr<scalar_t>(),
                                                         boxes.data_ptr<box_t>(),
                                                         out.data_ptr<out_t>(),
                                                         static_cast<index_t>(tiles),
                                                         thresholded};
  const index_t threads = kPasteThreads;
  cpu_for_each(p.num_masks * p.channels * tiles, 4, [&](int64_t b) {
    PlaneGeometry<index_t, T> g;
    paste_tile(f, static_cast<index_t>(b), index_t(0), threads, threads, g, NoSync{});
  });
}

template <typename scalar_t, typename T, typename box_t, typename out_t>
struct TileBody {
  static void run(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out,
                  const Params<box_t>& p, bool thresholded, bool index64) {
    if (fits_int32(out.numel(), masks.numel()) && !index64) {
      paste_tiles<int32_t, scalar_t, T, box_t, out_t>(masks, boxes, out, p, thresholded);
    } else {
      paste_tiles<int64_t, scalar_t, T, box_t, out_t>(masks, boxes, out, p, thresholded);
    }
  }
};

// Boxes are read in float32, or float64 when given as float64 (half boxes lose pixels).
at::Tensor boxes_for_math(const at::Tensor& boxes) {
  return boxes.to(math_type(boxes.scalar_type())).contiguous();
}

template <template <typename, typename, typename, typename> class Body>
at::Tensor paste(const at::Tensor& masks, const at::Tensor& boxes, int64_t height, int64_t width,
                 int64_t padding, std::optional<double> threshold, bool as_uint8,
                 bool index64 = false) {
  check_args(masks, boxes, height, width, padding);
  const bool thresholded = threshold.has_value();
  at::Tensor out = cpu_empty({masks.size(0), masks.size(1), height, width},
                             out_type(masks, thresholded, as_uint8));
  if (out.numel() == 0) return out;
  dispatch<Body>(masks.contiguous(), boxes_for_math(boxes), out, padding, threshold.value_or(0.0),
                 thresholded, index64);
  return out;
}

at::Tensor paste_masks_cpu(const at::Tensor& masks, const at::Tensor& boxes, int64_t height,
                           int64_t width, int64_t padding, std::optional<double> threshold,
                           bool as_uint8) {
  return paste<RowBody>(masks, boxes, height, width, padding, threshold, as_uint8);
}

// Test-only: the CUDA kernel's tiles run on the CPU; index64 forces the 64-bit index path
// (which the CUDA kernel takes only for outputs or masks of 2^31 elements or more).
at::Tensor paste_masks_elementwise_cpu(const at::Tensor& masks, const at::Tensor& boxes,
                                       int64_t height, int64_t width, int64_t padding,
                                       std::optional<double> threshold, bool as_uint8,
                                       bool index64) {
  return paste<TileBody>(masks, boxes, height, width, padding, threshold, as_uint8, index64);
}

// ---- COCO RLE ----

// Appends the run lengths of one mask in column-major order, starting with a (possibly
// empty) run of zeros, as COCO's RLE defines them.
void run_lengths(const uint8_t* m, int64_t H, int64_t W, std::vector<int64_t>& counts) {
  counts.clear();
  uint8_t prev = 0;
  int64_t run = 0;
  for (int64_t x = 0; x < W; ++x) {
    for (int64_t y = 0; y < H; ++y) {
      const uint8_t v = m[y * W + x] != 0;
      if (v != prev) {
        counts.push_back(run);
        run = 0;
        prev = v;
      }
      ++run;
    }
  }
  counts.push_back(run);
}

// COCO's compact string form of run lengths: each count (from the third on, as the
// difference to the count two before) in 5-bit groups, least significant first, 0x20 marking
// "more groups follow", offset by 48 into printable ASCII.
void compress_counts(const std::vector<int64_t>& counts, std::string& s) {
  s.clear();
  for (size_t i = 0; i < counts.size(); ++i) {
    int64_t x = counts[i] - (i > 2 ? counts[i - 2] : 0);
    bool more = true;
    while (more) {
      char c = static_cast<char>(x & 0x1f);
      x >>= 5;  // arithmetic shift: negative differences end at -1
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      s.push_back(static_cast<char>(c + 48));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> masks_to_rle_cpu(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() == 3, "masks must have shape [N, H, W], got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "masks must be bool or uint8, got ", masks.scalar_type());
  const at::Tensor m = masks.contiguous().view(at::kByte);
  const int64_t N = m.size(0), H = m.size(1), W = m.size(2);
  std::vector<std::string> strings(N);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<int64_t> counts;
    for (int64_t n = n0; n < n1; ++n) {
      run_lengths(m.data_ptr<uint8_t>() + n * H * W, H, W, counts);
      compress_counts(counts, strings[n]);
    }
  });
  at::Tensor lengths = at::empty({N}, m.options().dtype(at::kLong));
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) {
    lengths.data_ptr<int64_t>()[n] = static_cast<int64_t>(strings[n].size());
    total += static_cast<int64_t>(strings[n].size());
  }
  at::Tensor chars = at::empty({total}, m.options());
  uint8_t* cp = chars.data_ptr<uint8_t>();
  for (const auto& s : strings) {
    std::memcpy(cp, s.data(), s.size());
    cp += s.size();
  }
  return {chars, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("paste_masks", &paste_masks_cpu);
  m.impl("_masks_to_rle", &masks_to_rle_cpu);
}

TORCH_LIBRARY_IMPL(maskops_testing, CPU, m) {
  m.impl("_paste_masks_elementwise", &paste_masks_elementwise_cpu);
}

}  // namespace paste_masks
}  // namespace maskops
