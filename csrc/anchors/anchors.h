// Anchor grids for feature pyramids, shared by anchors_cpu.cpp and anchors_cuda.cu.
//
// Values and order are torchvision's AnchorGenerator's, bit for bit:
//   - cell anchors of a level: for each aspect ratio r (outer loop) and size s (inner loop),
//     h = sqrt(r), w = 1 / h, then round((-w * s, -h * s, w * s, h * s) / 2), every step in
//     float32 whatever the output dtype, rounding half to even (torch.round);
//   - the grid of a level: for each row y (outer), column x, cell anchor a (inner), the
//     anchor is the int32 shift (x * stride_w, y * stride_h, x * stride_w, y * stride_h)
//     plus the cell anchor, both converted to the output dtype and their sum rounded once
//     to it (exact in float32 and float64 below 2^24; half types round like torchvision);
//   - levels one after another.
// Boxes are (x1, y1, x2, y2); stride = image size // feature size, per axis.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace maskops {
namespace anchors {

// A level's row in the int64 level table: where its cells and its anchors start in the
// output, its grid, strides, and where its sizes and aspect ratios start in the flat size /
// ratio arrays.
enum LevelField : int {
  kFirstCell = 0,
  kFirst,
  kHeight,
  kWidth,
  kStrideH,
  kStrideW,
  kNumSizes,
  kNumRatios,
  kSizeOffset,
  kRatioOffset,
  kLevelFields
};

// std::nearbyint (without SSE4.1 it is a library call): adding and subtracting 2^23 rounds a
// magnitude below 2^23 to an integer, half to even, in the default rounding mode; from 2^23
// on every float is an integer already. NaN and inf pass through.
inline float round_half_even(float v) {
  constexpr float kTwo23 = 8388608.0f;
  const float a = std::fabs(v);
  return std::copysign(a < kTwo23 ? (a + kTwo23) - kTwo23 : a, v);
}

// Half the width and height of the cell anchor for one size and aspect ratio (height /
// width), rounded like torchvision: the cell anchor is (-hw, -hh, hw, hh). round() is
// symmetric, so round(-x / 2) = -round(x / 2).
HOST_DEVICE inline void cell_anchor(float size, float ratio, float& hw, float& hh) {
#if defined(__CUDA_ARCH__)
  const float h_ratio = __fsqrt_rn(ratio);
  const float w_ratio = __fdiv_rn(1.0f, h_ratio);
  hw = rintf(__fmul_rn(w_ratio, size) * 0.5f);
  hh = rintf(__fmul_rn(h_ratio, size) * 0.5f);
#else
  const float h_ratio = std::sqrt(ratio);
  const float w_ratio = 1.0f / h_ratio;
  hw = round_half_even(w_ratio * size * 0.5f);
  hh = round_half_even(h_ratio * size * 0.5f);
#endif
}

// The anchors of one feature cell (every size and ratio of its level, 4 outputs each) per
// call: i runs over the cells of all levels. T is the math type: float, or double for double
// output.
template <typename scalar_t, typename T>
struct AnchorGrid {
  const int64_t* levels;  // [num_levels, kLevelFields]
  int64_t num_levels;
  const float* sizes;   // every level's sizes, one after another
  const float* ratios;  // every level's aspect ratios
  scalar_t* out;        // [total, 4]

  HOST_DEVICE void operator()(int64_t i) const {
    int64_t l = 0;
    while (l + 1 < num_levels && i >= levels[(l + 1) * kLevelFields + kFirstCell]) ++l;
    const int64_t* lv = levels + l * kLevelFields;
    const int64_t cell = i - lv[kFirstCell];
    const int64_t y = cell / lv[kWidth], x = cell % lv[kWidth];
    // torchvision's shifts are int32 (an int32 arange times the stride).
    const int32_t sx = static_cast<int32_t>(x * lv[kStrideW]);
    const int32_t sy = static_cast<int32_t>(y * lv[kStrideH]);
    const int64_t num_sizes = lv[kNumSizes], num_ratios = lv[kNumRatios];
    const float* s = sizes + lv[kSizeOffset];
    const float* r = ratios + lv[kRatioOffset];
    scalar_t* o = out + 4 * (lv[kFirst] + cell * num_sizes * num_ratios);
    for (int64_t a = 0; a < num_ratios; ++a) {
      for (int64_t b = 0; b < num_sizes; ++b, o += 4) {
        float hw, hh;
        cell_anchor(s[b], r[a], hw, hh);
        o[0] = sum(sx, -hw);
        o[1] = sum(sy, -hh);
        o[2] = sum(sx, hw);
        o[3] = sum(sy, hh);
      }
    }
  }

  // shift + cell anchor coordinate, each first converted to the output dtype (as torch's
  // int32 + floating tensor addition does), added in T and rounded once.
  HOST_DEVICE static scalar_t sum(int32_t shift, float base) {
    const T s = static_cast<T>(static_cast<scalar_t>(static_cast<T>(shift)));
    const T b = static_cast<T>(static_cast<scalar_t>(base));
    return static_cast<scalar_t>(s + b);
  }
};

}  // namespace anchors
}  // namespace maskops
