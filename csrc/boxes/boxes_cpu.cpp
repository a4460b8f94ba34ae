// Box coding, clipping and the small-box filter on the CPU.
//
// encode / decode run in two passes around torch's own vectorised log / exp (see
// box_coder.h): pass 1 writes their arguments to a buffer, at::log_ / at::exp_ runs on it,
// pass 2 finishes. That keeps float32 and float64 results identical to torchvision's. The
// passes go chunk by chunk (common/cpu_chunks.h: the buffer stays in cache, and at most one
// parallel region is started). The test-only ops _encode_boxes_elementwise /
// _decode_boxes_elementwise run the one-pass CUDA functors instead.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

// From here on no fused multiply-adds: the op's math rounds as torch's (see the header).
#include "common/no_fp_contract.h"

#include "boxes/box_coder.h"
#include "boxes/boxes_args.h"
#include "common/cpu_chunks.h"
#include "common/host_device.h"

namespace maskops {
namespace boxes {
namespace {

// Work per task. A parallel region waits for every thread to be scheduled, which on a busy
// machine can take a whole time slice (milliseconds), so a second thread is only woken for
// about 2 ms of single-thread work: 2^18 codes (about 5 ns each, exp / log included) or boxes,
// 2^21 coordinates to clip.
constexpr int64_t kGrain = int64_t(1) << 18;
constexpr int64_t kClipGrain = int64_t(1) << 21;
// Two-pass kernels, when parallel: elements per chunk (their exp / log arguments stay in L2).
constexpr int64_t kChunk = 8192;

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
    scalar_t* op = out.data_ptr<scalar_t>();
    cpu_for_each_chunk(n, kChunk, kGrain, [&](int64_t lo, int64_t hi) {
      at::Tensor buf = at::empty({2 * (hi - lo)}, codes.options().dtype(mt));
      T* bp = buf.data_ptr<T>();
      const DecodeLogScales<scalar_t, T, T> pass1{in, bp, lo};
      for (int64_t i = lo; i < hi; ++i) pass1(i);
      buf.exp_();
      const DecodeFinish<scalar_t, T, T> pass2{in, bp, lo, op};
      for (int64_t i = lo; i < hi; ++i) pass2(i);
    });
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
    scalar_t* op = out.data_ptr<scalar_t>();
    cpu_for_each_chunk(n, kChunk, kGrain, [&](int64_t lo, int64_t hi) {
      at::Tensor buf = at::empty({2 * (hi - lo)}, r.options().dtype(mt));
      T* bp = buf.data_ptr<T>();
      const EncodeRatios<scalar_t, T> pass1{in, bp, lo, op};
      for (int64_t i = lo; i < hi; ++i) pass1(i);
      buf.log_();
      const EncodeFinish<scalar_t, T> pass2{in.w, bp, lo, op};
      for (int64_t i = lo; i < hi; ++i) pass2(i);
    });
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
    cpu_for_each(b.numel(), kClipGrain,
                 Clip<scalar_t, T>{b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), w, h});
  });
  return out;
}

at::Tensor remove_small_cpu(const at::Tensor& boxes, double min_size) {
  check_small(boxes, min_size);
  const at::Tensor b = boxes.contiguous();
  at::Tensor keep = at::empty({b.size(0)}, b.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, b.scalar_type(), "remove_small_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const T m = static_cast<T>(static_cast<scalar_t>(min_size));
        cpu_for_each(b.size(0), kGrain,
                     LargeEnough<scalar_t, T>{b.data_ptr<scalar_t>(), m, keep.data_ptr<bool>()});
      });
  // The indices of the kept boxes: a serial pass (cheaper than at::nonzero at these sizes).
  const bool* kp = keep.data_ptr<bool>();
  const int64_t n = b.size(0);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += kp[i];
  // Branch-free: every index is written, and kept ones advance (one spare slot at the end).
  at::Tensor out = at::empty({count + 1}, b.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < n; ++i) {
    op[j] = i;
    j += kp[i];
  }
  return out.resize_({count});
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CPU, m) {
  m.impl("decode_boxes", &decode_cpu);
  m.impl("encode_boxes", &encode_cpu);
  m.impl("clip_boxes", &clip_cpu);
  m.impl("remove_small_boxes", &remove_small_cpu);
}

TORCH_LIBRARY_IMPL(maskops_testing, CPU, m) {
  m.impl("_decode_boxes_elementwise", &decode_elementwise_cpu);
  m.impl("_encode_boxes_elementwise", &encode_elementwise_cpu);
}

}  // namespace boxes
}  // namespace maskops
