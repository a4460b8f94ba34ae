// A 2-d transpose for CPU kernels that compute in one layout and store in another
// (e.g. RoIAlign's [bins][channels] tiles written to [channels][bins] outputs).
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

#if defined(MASKOPS_X86)
#include <immintrin.h>
#endif

namespace maskops {
namespace detail {

#if defined(MASKOPS_X86)
// 8x8 float block: dst row j = src column j.
__attribute__((target("avx2"))) inline void transpose8x8(const float* src, int64_t ss, float* dst,
                                                         int64_t ds) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

__attribute__((target("avx2"))) inline void transpose_avx2(const float* src, int64_t rows,
                                                           int64_t cols, int64_t ss, float* dst,
                                                           int64_t ds) {
  const int64_t r8 = rows - rows % 8, c8 = cols - cols % 8;
  for (int64_t i = 0; i < r8; i += 8)
    for (int64_t j = 0; j < c8; j += 8) transpose8x8(src + i * ss + j, ss, dst + j * ds + i, ds);
  for (int64_t i = 0; i < rows; ++i) {  // ragged edges
    for (int64_t j = (i < r8 ? c8 : 0); j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
}
#endif

}  // namespace detail

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols.
template <typename S, typename D>
inline void transpose(const S* src, int64_t rows, int64_t cols, int64_t src_stride, D* dst,
                      int64_t dst_stride) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      dst[j * dst_stride + i] = static_cast<D>(src[i * src_stride + j]);
}

inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_stride, float* dst,
                      int64_t dst_stride) {
#if defined(MASKOPS_X86)
  if (cpu_isa() != CpuIsa::kDefault) {
    detail::transpose_avx2(src, rows, cols, src_stride, dst, dst_stride);
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

}  // namespace maskops
