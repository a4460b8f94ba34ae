// Argument checks shared by the CPU and CUDA wrappers. The Python front (maskops/_validate.py)
// checks the same things first with friendlier messages; these guard direct torch.ops callers.
// Also the two rules every wrapper follows: the output layout and the math type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace maskops {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating point tensor, got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim(), " (shape ",
              t.sizes(), ")");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

// Outputs follow their input's layout: channels-last when the input is densely channels-last
// (and not also plain contiguous, as with 1x1 maps), contiguous otherwise. maskops/_validate.py
// mirrors this rule for the fake kernels.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  return (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// The dtype kernels compute in: float64 for float64 inputs, float32 for every other floating
// type (half types compute and accumulate in float32).
inline at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Tensors whose element count does not fit 31 bits on one axis are fine; only the total
// must fit int64, which ATen already guarantees. Kernels index with int64_t throughout.

}  // namespace maskops
