// The SIMD level of maskops' own CPU kernels: the one place in csrc/ that asks the CPU.
//
// Hot loops are compiled three times (AVX-512, AVX2, portable; MASKOPS_ISA_VARIANTS_WIDTH below)
// and each call takes the variant of cpu_isa(): the widest level the CPU supports, lowered
// by the environment variable MASKOPS_CPU_ISA=avx512|avx2|default (read once, at load) or by
// set_cpu_isa() (maskops.cpu's test seam). A cap lets the AVX2 and portable paths be run,
// tested and timed on an AVX-512 machine; it never raises the level above the CPU's.
#pragma once

#include <cstdint>

namespace maskops {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The level the CPU itself supports (GCC's __builtin_cpu_supports).
CpuIsa cpu_isa_supported();
// The level the kernels dispatch to now.
CpuIsa cpu_isa();
// Sets the level (clamped to cpu_isa_supported()); returns the level now in force.
CpuIsa set_cpu_isa(CpuIsa isa);

const char* cpu_isa_name(CpuIsa isa);
// kDefault for "default", ...; returns false for an unknown name.
bool parse_cpu_isa(const char* name, CpuIsa* out);

}  // namespace maskops

#if defined(__x86_64__) || defined(_M_X64)
#define MASKOPS_X86 1
// `ret name(params)` calling `body<Bytes>` (an always-inline template whose first template
// argument is its vector width in bytes, so that it is compiled for each target) in three
// variants, 64 bytes for AVX-512, 32 for AVX2 and 16 for the portable one (SSE2, x86-64's
// baseline), and a dispatcher on cpu_isa(). `args` repeats the parameters' names. Each
// target gets its own register width because GCC lowers vectors wider than the target's
// registers lane by lane for some operations (selects, compares).
#define MASKOPS_ISA_VARIANTS_WIDTH(ret, name, params, args, body)                              \
  __attribute__((target("avx512f"))) static ret name##_avx512 params { return body<64> args; } \
  __attribute__((target("avx2"))) static ret name##_avx2 params { return body<32> args; }      \
  static ret name##_default params { return body<16> args; }                                   \
  ret name params {                                                                            \
    switch (::maskops::cpu_isa()) {                                                            \
      case ::maskops::CpuIsa::kAvx512:                                                         \
        return name##_avx512 args;                                                             \
      case ::maskops::CpuIsa::kAvx2:                                                           \
        return name##_avx2 args;                                                               \
      default:                                                                                 \
        return name##_default args;                                                            \
    }                                                                                          \
  }
#else
#define MASKOPS_ISA_VARIANTS_WIDTH(ret, name, params, args, body) \
  ret name params { return body<16> args; }
#endif
