#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace maskops {
namespace {

CpuIsa detect() {
#if defined(MASKOPS_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kDefault;
}

CpuIsa clamp(CpuIsa isa) {
  const CpuIsa top = cpu_isa_supported();
  return static_cast<int>(isa) < static_cast<int>(top) ? isa : top;
}

CpuIsa from_environment() {
  CpuIsa isa = cpu_isa_supported();
  // An unknown value is ignored here; maskops.cpu reports it as an error at import.
  const char* cap = std::getenv("MASKOPS_CPU_ISA");
  CpuIsa asked;
  if (cap != nullptr && parse_cpu_isa(cap, &asked)) isa = clamp(asked);
  return isa;
}

std::atomic<int>& current() {
  static std::atomic<int> level{static_cast<int>(from_environment())};
  return level;
}

}  // namespace

CpuIsa cpu_isa_supported() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa cpu_isa() { return static_cast<CpuIsa>(current().load(std::memory_order_relaxed)); }

CpuIsa set_cpu_isa(CpuIsa isa) {
  const CpuIsa now = clamp(isa);
  current().store(static_cast<int>(now), std::memory_order_relaxed);
  return now;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

bool parse_cpu_isa(const char* name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(name, cpu_isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace maskops
