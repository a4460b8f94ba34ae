// Box coding (torchvision's BoxCoder), clipping and the small-box test, shared by
// boxes_cpu.cpp, boxes_cuda.cu and the RPN proposal kernels (csrc/rpn).
//
// Boxes are (x1, y1, x2, y2). A box's code relative to a reference box with width w,
// height h and centre (cx, cy) = (x1 + 0.5 w, y1 + 0.5 h) is
//   (wx (cx' - cx) / w, wy (cy' - cy) / h, ww log(w' / w), wh log(h' / h)).
// Every expression below is torchvision's, operation for operation and in its order, each
// operation rounded separately (the *_rn helpers of nms.h keep nvcc from fusing a multiply
// and an add; host files that include this header turn contraction off), so float32 and
// float64 results are torchvision's bit for bit given the same exp / log. Half types compute
// in float32 and round once at the end (torchvision rounds after every operation).
//
// exp and log: torch's CPU exp and log are its own vectorised functions, whose results differ
// from the C library's in the last bit for a good part of all inputs. The CPU kernels
// therefore split each computation in two: part 1 writes the arguments of exp (or log) to a
// buffer, torch's own at::exp_ / at::log_ runs on it, and part 2 finishes. On CUDA, and in the
// test-only ops that run the CUDA functors on the CPU, one functor calls exp / log directly
// (on the GPU that is the same expf / logf torch's CUDA kernels call).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "nms/nms.h"

namespace maskops {
namespace boxes {

using nms::add_rn;
using nms::div_rn;
using nms::mul_rn;
using nms::sub_rn;

template <typename T>
struct Weights {
  T wx, wy, ww, wh;
};

#if defined(__CUDA_ARCH__)
#define MASKOPS_MATH(device_expr, host_expr) device_expr
#else
#define MASKOPS_MATH(device_expr, host_expr) host_expr
#endif
HOST_DEVICE inline float exp_math(float x) { return MASKOPS_MATH(expf(x), std::exp(x)); }
HOST_DEVICE inline double exp_math(double x) { return MASKOPS_MATH(exp(x), std::exp(x)); }
HOST_DEVICE inline float log_math(float x) { return MASKOPS_MATH(logf(x), std::log(x)); }
HOST_DEVICE inline double log_math(double x) { return MASKOPS_MATH(log(x), std::log(x)); }
#undef MASKOPS_MATH

// torch.clamp(x, max=hi): NaN stays NaN.
template <typename T>
HOST_DEVICE inline T clamp_max(T x, T hi) {
  return x > hi ? hi : x;
}

// torch.clamp(x, min=0, max=hi), hi >= 0: NaN stays NaN.
template <typename T>
HOST_DEVICE inline T clamp_to(T x, T hi) {
  if (x < T(0)) return T(0);
  return x > hi ? hi : x;
}

// ---- decode ----

// Part 1: the clamped log-scales (dw, dh) of code d (4 values), whose exp part 2 needs.
template <typename T>
HOST_DEVICE inline void decode_log_scales(const T* d, const Weights<T>& w, T clip, T& dw, T& dh) {
  dw = clamp_max(div_rn(d[2], w.ww), clip);
  dh = clamp_max(div_rn(d[3], w.wh), clip);
}

// Part 2: the box of code d relative to reference box b, given exp(dw) and exp(dh).
template <typename T>
HOST_DEVICE inline void decode_box(const T* b, const T* d, T exp_dw, T exp_dh, const Weights<T>& w,
                                   T* out) {
  const T half = T(0.5);
  const T width = sub_rn(b[2], b[0]);
  const T height = sub_rn(b[3], b[1]);
  const T ctr_x = add_rn(b[0], mul_rn(half, width));
  const T ctr_y = add_rn(b[1], mul_rn(half, height));
  const T dx = div_rn(d[0], w.wx);
  const T dy = div_rn(d[1], w.wy);
  const T pred_ctr_x = add_rn(mul_rn(dx, width), ctr_x);
  const T pred_ctr_y = add_rn(mul_rn(dy, height), ctr_y);
  const T half_w = mul_rn(half, mul_rn(exp_dw, width));
  const T half_h = mul_rn(half, mul_rn(exp_dh, height));
  out[0] = sub_rn(pred_ctr_x, half_w);
  out[1] = sub_rn(pred_ctr_y, half_h);
  out[2] = add_rn(pred_ctr_x, half_w);
  out[3] = add_rn(pred_ctr_y, half_h);
}

// rel_codes [N, K * 4] and reference boxes [N, 4] read in the math type T; element i is
// (box i / K, class i % K).
template <typename code_t, typename box_t, typename T>
struct DecodeInputs {
  const code_t* codes;
  const box_t* boxes;
  int64_t classes;  // K
  Weights<T> w;
  T clip;

  HOST_DEVICE void load(int64_t i, T* b, T* d) const {
    const box_t* bp = boxes + 4 * (i / classes);
    const code_t* dp = codes + 4 * i;
    for (int c = 0; c < 4; ++c) {
      b[c] = static_cast<T>(bp[c]);
      d[c] = static_cast<T>(dp[c]);
    }
  }
};

// CPU part 1: log-scales of element i into buf[2 (i - first)] and the next slot (buf holds
// one chunk of elements, from `first` on).
template <typename code_t, typename box_t, typename T>
struct DecodeLogScales {
  DecodeInputs<code_t, box_t, T> in;
  T* buf;
  int64_t first;
  HOST_DEVICE void operator()(int64_t i) const {
    T b[4], d[4];
    in.load(i, b, d);
    T* e = buf + 2 * (i - first);
    decode_log_scales(d, in.w, in.clip, e[0], e[1]);
  }
};

// CPU part 2: buf now holds the exps.
template <typename code_t, typename box_t, typename T>
struct DecodeFinish {
  DecodeInputs<code_t, box_t, T> in;
  const T* buf;
  int64_t first;
  code_t* out;  // [N, K, 4]
  HOST_DEVICE void operator()(int64_t i) const {
    T b[4], d[4], o[4];
    in.load(i, b, d);
    const T* e = buf + 2 * (i - first);
    decode_box(b, d, e[0], e[1], in.w, o);
    for (int c = 0; c < 4; ++c) out[4 * i + c] = static_cast<code_t>(o[c]);
  }
};

// The one-pass functor (CUDA; test-only on the CPU).
template <typename code_t, typename box_t, typename T>
struct Decode {
  DecodeInputs<code_t, box_t, T> in;
  code_t* out;  // [N, K, 4]
  HOST_DEVICE void operator()(int64_t i) const {
    T b[4], d[4], o[4], dw, dh;
    in.load(i, b, d);
    decode_log_scales(d, in.w, in.clip, dw, dh);
    decode_box(b, d, exp_math(dw), exp_math(dh), in.w, o);
    for (int c = 0; c < 4; ++c) out[4 * i + c] = static_cast<code_t>(o[c]);
  }
};

// ---- encode ----

// Part 1: (dx, dy) of box p relative to reference r, and the ratios (w_r / w_p, h_r / h_p)
// whose log part 2 takes. (torchvision's encode_boxes: p = proposals, r = reference_boxes.)
template <typename T>
HOST_DEVICE inline void encode_part1(const T* r, const T* p, const Weights<T>& w, T* out,
                                     T& ratio_w, T& ratio_h) {
  const T half = T(0.5);
  const T ex_w = sub_rn(p[2], p[0]);
  const T ex_h = sub_rn(p[3], p[1]);
  const T ex_ctr_x = add_rn(p[0], mul_rn(half, ex_w));
  const T ex_ctr_y = add_rn(p[1], mul_rn(half, ex_h));
  const T gt_w = sub_rn(r[2], r[0]);
  const T gt_h = sub_rn(r[3], r[1]);
  const T gt_ctr_x = add_rn(r[0], mul_rn(half, gt_w));
  const T gt_ctr_y = add_rn(r[1], mul_rn(half, gt_h));
  out[0] = div_rn(mul_rn(w.wx, sub_rn(gt_ctr_x, ex_ctr_x)), ex_w);
  out[1] = div_rn(mul_rn(w.wy, sub_rn(gt_ctr_y, ex_ctr_y)), ex_h);
  ratio_w = div_rn(gt_w, ex_w);
  ratio_h = div_rn(gt_h, ex_h);
}

template <typename scalar_t, typename T>
struct EncodeInputs {
  const scalar_t* reference;  // [N, 4]
  const scalar_t* proposals;  // [N, 4]
  Weights<T> w;

  HOST_DEVICE void load(int64_t i, T* r, T* p) const {
    for (int c = 0; c < 4; ++c) {
      r[c] = static_cast<T>(reference[4 * i + c]);
      p[c] = static_cast<T>(proposals[4 * i + c]);
    }
  }
};

// CPU part 1: dx, dy into out; the ratios into buf[2 (i - first)] and the next slot.
template <typename scalar_t, typename T>
struct EncodeRatios {
  EncodeInputs<scalar_t, T> in;
  T* buf;
  int64_t first;
  scalar_t* out;  // [N, 4]
  HOST_DEVICE void operator()(int64_t i) const {
    T r[4], p[4], o[4];
    in.load(i, r, p);
    T* e = buf + 2 * (i - first);
    encode_part1(r, p, in.w, o, e[0], e[1]);
    out[4 * i + 0] = static_cast<scalar_t>(o[0]);
    out[4 * i + 1] = static_cast<scalar_t>(o[1]);
  }
};

// CPU part 2: buf now holds the logs.
template <typename scalar_t, typename T>
struct EncodeFinish {
  Weights<T> w;
  const T* buf;
  int64_t first;
  scalar_t* out;
  HOST_DEVICE void operator()(int64_t i) const {
    const T* e = buf + 2 * (i - first);
    out[4 * i + 2] = static_cast<scalar_t>(mul_rn(w.ww, e[0]));
    out[4 * i + 3] = static_cast<scalar_t>(mul_rn(w.wh, e[1]));
  }
};

// The one-pass functor (CUDA; test-only on the CPU).
template <typename scalar_t, typename T>
struct Encode {
  EncodeInputs<scalar_t, T> in;
  scalar_t* out;
  HOST_DEVICE void operator()(int64_t i) const {
    T r[4], p[4], o[4], ratio_w, ratio_h;
    in.load(i, r, p);
    encode_part1(r, p, in.w, o, ratio_w, ratio_h);
    o[2] = mul_rn(in.w.ww, log_math(ratio_w));
    o[3] = mul_rn(in.w.wh, log_math(ratio_h));
    for (int c = 0; c < 4; ++c) out[4 * i + c] = static_cast<scalar_t>(o[c]);
  }
};

// ---- clip, small boxes ----

// One coordinate per call: x clamped to [0, width], y to [0, height] (torchvision's
// clip_boxes_to_image). In a half type the bound is rounded to it first, as torch does; the
// result is the same as clamping in float32 and rounding.
template <typename scalar_t, typename T>
struct Clip {
  const scalar_t* in;
  scalar_t* out;
  T width, height;
  HOST_DEVICE void operator()(int64_t i) const {
    const T v = static_cast<T>(in[i]);
    out[i] = static_cast<scalar_t>(clamp_to(v, (i & 1) ? height : width));
  }
};

// Is the box at least min_size wide and high? The sides are rounded to the boxes' dtype and
// min_size has been rounded to it (torchvision's `ws >= min_size` on a tensor of that dtype).
template <typename scalar_t, typename T>
HOST_DEVICE inline bool large_enough(const scalar_t* b, T min_size) {
  const T w = static_cast<T>(static_cast<scalar_t>(static_cast<T>(b[2]) - static_cast<T>(b[0])));
  const T h = static_cast<T>(static_cast<scalar_t>(static_cast<T>(b[3]) - static_cast<T>(b[1])));
  return (w >= min_size) & (h >= min_size);  // no branch: the outcome is often unpredictable
}

template <typename scalar_t, typename T>
struct LargeEnough {
  const scalar_t* boxes;
  T min_size;
  bool* keep;
  HOST_DEVICE void operator()(int64_t i) const { keep[i] = large_enough(boxes + 4 * i, min_size); }
};

}  // namespace boxes
}  // namespace maskops
