// Box coding, clipping and the small-box filter on the CPU.
//
// encode / decode run in two passes around torch's own vectorised log / exp (see
// box_coder.h): pass 1 writes their arguments to a buffer, at::log_ / at::exp_ runs on it,
// pass 2 finishes. That keeps float32 and float64 results identical to torchvision's. The
// test-only ops _encode_boxes_elementwise / _decode_boxes_elementwise run the one-pass CUDA
// functors instead.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/nonzero.h>
#include <torch/library.h>

// No fused multiply-adds: every operation rounds separately, as torch's do.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "boxes/box_coder.h"
#include "boxes/boxes_args.h"
#include "common/host_device.h"

namespace maskops {
namespace boxes {
namespace {

// Elements per task: each is a few tens of flops, so small inputs stay on one thread.
constexpr int64_t kGrain = 16384;

at::Tensor decode_impl(const at::Tensor& rel_codes, const at::Tensor& boxes,
                       at::ArrayRef<double> weights, double clamp, bool one_pass) {
  check_decode(rel_codes, boxes, weights, clamp);
  const int64_t N = rel_codes.size(0), K = rel_codes.size(1) / 4;
  at::Tensor out = at::empty({N, K, 4}, rel_codes.options());
  const int64_t n = N * K;
  if (n == 0) return out;
  const at::Tensor codes = rel_codes.contiguous();
  // Reference boxes are read in the codes' math type (torchvision converts them to the codes'
  // dtype first; for float32 and float64 codes that is the same).
  const at::ScalarType mt = math_type(rel_codes.scalar_type());
  const at::Tensor ref = boxes.to(mt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const DecodeInputs<scalar_t, T, T> in{codes.data_ptr<scalar_t>(), ref.data_ptr<T>(), K,
                                          check_weights<T>(weights), static_cast<T>(clamp)};
    if (one_pass) {
      cpu_for_each(n, kGrain, Decode<scalar_t, T, T>{in, out.data_ptr<scalar_t>()});
      return;
    }
    at::Tensor buf = at::empty({2 * n}, codes.options().dtype(mt));
    cpu_for_each(n, kGrain, DecodeLogScales<scalar_t, T, T>{in, buf.data_ptr<T>()});
    buf.exp_();
    cpu_for_each(n, kGrain,
                 DecodeFinish<scalar_t, T, T>{in, buf.data_ptr<T>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor decode_cpu(const at::Tensor& rel_codes, const at::Tensor& boxes,
                      at::ArrayRef<double> weights, double clamp) {
  return decode_impl(rel_codes, boxes, weights, clamp, /*one_pass=*/false);
}

at::Tensor decode_elementwise_cpu(const at::Tensor& rel_codes, const at::Tensor& boxes,
                                  at::ArrayRef<double> weights, double clamp) {
  return decode_impl(rel_codes, boxes, weights, clamp, /*one_pass=*/true);
}

at::Tensor encode_impl(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                       at::ArrayRef<double> weights, bool one_pass) {
  check_encode(reference_boxes, proposals, weights);
  const int64_t n = reference_boxes.size(0);
  at::Tensor out = at::empty({n, 4}, reference_boxes.options());
  if (n == 0) return out;
  const at::Tensor r = reference_boxes.contiguous(), p = proposals.contiguous();
  const at::ScalarType mt = math_type(r.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const EncodeInputs<scalar_t, T> in{r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                                       check_weights<T>(weights)};
    if (one_pass) {
      cpu_for_each(n, kGrain, Encode<scalar_t, T>{in, out.data_ptr<scalar_t>()});
      return;
    }
    at::Tensor partial = at::empty({n, 4}, r.options().dtype(mt));
    at::Tensor buf = at::empty({2 * n}, r.options().dtype(mt));
    cpu_for_each(n, kGrain,
                 EncodeRatios<scalar_t, T>{in, partial.data_ptr<T>(), buf.data_ptr<T>()});
    buf.log_();
    cpu_for_each(n, kGrain, EncodeFinish<scalar_t, T>{partial.data_ptr<T>(), buf.data_ptr<T>(),
                                                      in.w, out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor encode_cpu(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                      at::ArrayRef<double> weights) {
  return encode_impl(reference_boxes, proposals, weights, /*one_pass=*/false);
}

at::Tensor encode_elementwise_cpu(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                                  at::ArrayRef<double> weights) {
  return encode_impl(reference_boxes, proposals, weights, /*one_pass=*/true);
}

at::Tensor clip_cpu(const at::Tensor& boxes, int64_t height, int64_t width) {
  check_clip(boxes, height, width);
  const at::Tensor b = boxes.contiguous();
  at::Tensor out = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "clip_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    // The bounds in the boxes' dtype, as torch.clamp converts them.
    const T w = static_cast<T>(static_cast<scalar_t>(width));
    const T h = static_cast<T>(static_cast<scalar_t>(height));
    cpu_for_each(b.numel(), 4 * kGrain,
                 Clip<scalar_t, T>{b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), w, h});
  });
  return out;
}

at::Tensor remove_small_cpu(const at::Tensor& boxes, double min_size) {
  check_small(boxes, min_size);
  const at::Tensor b = boxes.contiguous();
  at::Tensor keep = at::empty({b.size(0)}, b.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "remove_small_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T m = static_cast<T>(static_cast<scalar_t>(min_size));
    cpu_for_each(b.size(0), kGrain,
                 LargeEnough<scalar_t, T>{b.data_ptr<scalar_t>(), m, keep.data_ptr<bool>()});
  });
  return at::nonzero(keep).view({-1});
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("decode_boxes", &decode_cpu);
  m.impl("encode_boxes", &encode_cpu);
  m.impl("clip_boxes", &clip_cpu);
  m.impl("remove_small_boxes", &remove_small_cpu);
  m.impl("_decode_boxes_elementwise", &decode_elementwise_cpu);
  m.impl("_encode_boxes_elementwise", &encode_elementwise_cpu);
}

}  // namespace boxes
}  // namespace maskops
