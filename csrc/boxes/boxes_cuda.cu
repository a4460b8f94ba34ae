// Box coding, clipping and the small-box filter on CUDA: launch logic only. One thread per
// code / coordinate / box, running the one-pass functors of box_coder.h (which the CPU
// test-only ops run too). exp and log are the device's expf / logf, the functions torch's own
// CUDA kernels call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/nonzero.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "boxes/box_coder.h"
#include "boxes/boxes_args.h"
#include "common/launch_cuda.cuh"

namespace maskops {
namespace boxes {
namespace {

at::Tensor decode_cuda(const at::Tensor& rel_codes, const at::Tensor& boxes,
                       at::ArrayRef<double> weights, double clamp) {
  check_decode(rel_codes, boxes, weights, clamp);
  c10::cuda::CUDAGuard guard(rel_codes.device());
  const int64_t N = rel_codes.size(0), K = rel_codes.size(1) / 4;
  at::Tensor out = at::empty({N, K, 4}, rel_codes.options());
  if (N * K == 0) return out;
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor ref = boxes.to(math_type(rel_codes.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const DecodeInputs<scalar_t, T, T> in{codes.data_ptr<scalar_t>(), ref.data_ptr<T>(), K,
                                              check_weights<T>(weights), static_cast<T>(clamp)};
        cuda_for_each(N * K, Decode<scalar_t, T, T>{in, out.data_ptr<scalar_t>()});
      });
  return out;
}

at::Tensor encode_cuda(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                       at::ArrayRef<double> weights) {
  check_encode(reference_boxes, proposals, weights);
  c10::cuda::CUDAGuard guard(reference_boxes.device());
  const int64_t n = reference_boxes.size(0);
  at::Tensor out = at::empty({n, 4}, reference_boxes.options());
  if (n == 0) return out;
  const at::Tensor r = reference_boxes.contiguous(), p = proposals.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const EncodeInputs<scalar_t, T> in{r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                                       check_weights<T>(weights)};
    cuda_for_each(n, Encode<scalar_t, T>{in, out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor clip_cuda(const at::Tensor& boxes, int64_t height, int64_t width) {
  check_clip(boxes, height, width);
  c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor b = boxes.contiguous();
  at::Tensor out = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "clip_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const T w = static_cast<T>(static_cast<scalar_t>(width));
    const T h = static_cast<T>(static_cast<scalar_t>(height));
    cuda_for_each(b.numel(),
                  Clip<scalar_t, T>{b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), w, h});
  });
  return out;
}

// The kept indices' count is data-dependent: at::nonzero waits for the GPU once.
at::Tensor remove_small_cuda(const at::Tensor& boxes, double min_size) {
  check_small(boxes, min_size);
  c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor b = boxes.contiguous();
  at::Tensor keep = at::empty({b.size(0)}, b.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, b.scalar_type(), "remove_small_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const T m = static_cast<T>(static_cast<scalar_t>(min_size));
        cuda_for_each(b.size(0),
                      LargeEnough<scalar_t, T>{b.data_ptr<scalar_t>(), m, keep.data_ptr<bool>()});
      });
  return at::nonzero(keep).view({-1});
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) {
  m.impl("decode_boxes", &decode_cuda);
  m.impl("encode_boxes", &encode_cuda);
  m.impl("clip_boxes", &clip_cuda);
  m.impl("remove_small_boxes", &remove_small_cuda);
}

}  // namespace boxes
}  // namespace maskops
