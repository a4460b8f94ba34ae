#!/usr/bin/env bash
# `make test-cpu-kinds`: the tests that depend on the CPU, on CPU kinds this machine is not.
#
#   1. Emulated AVX2 CPU without AVX-512 or native bfloat16 (qemu-x86_64 -cpu Haswell):
#      `python -m maskops.check --quick`, tests/test_cpu_kinds.py (maskops.cpu, the kernels'
#      SIMD levels, the bfloat16 model, --amp, autocast), the benchmark's bfloat16 plan and
#      the fused layers' bfloat16 cases (tests/test_fuse.py, but its largest shapes).
#   2. Emulated CPU without AVX (qemu-x86_64 -cpu Nehalem, the portable kernels): the check
#      of NMS and RoIAlign, and tests/test_cpu_kinds.py. (Emulation runs 10-30x slower than
#      the host: small models and shapes only.)
#   3. AVX2 numerics at full speed on this CPU (ONEDNN_MAX_CPU_ISA=AVX2,
#      ATEN_CPU_CAPABILITY=avx2, MASKOPS_CPU_ISA=avx2), then scalar numerics
#      (ONEDNN_MAX_CPU_ISA=SSE41, ATEN_CPU_CAPABILITY=default, MASKOPS_CPU_ISA=default): the
#      model-size equivalence tests, whose injected errors must fail the check on every kind.
#
# Installs qemu-user (a Debian package) when it is missing. Emulated processes' own children
# run on the host CPU (qemu-user does not follow exec), so tests that start a subprocess
# compare nothing there with the parent's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
pytest=("$py" -m pytest -q -p no:cacheprovider --benchmark-disable)

if [ "$(uname -m)" != "x86_64" ]; then
  echo "test-cpu-kinds: x86-64 CPU kinds only; this machine is $(uname -m)"
  exit 0
fi
if ! command -v qemu-x86_64 > /dev/null; then
  echo "test-cpu-kinds: installing qemu-user"
  if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
  $sudo apt-get update -qq > /dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user > /dev/null
fi

# qemu warns about host-only CPUID bits it cannot emulate; they are not errors.
quiet() { grep -v "TCG doesn't support requested feature" || true; }

emulated() {
  local model="$1"; shift
  echo "== qemu-x86_64 -cpu $model: $*"
  # pipefail: the exit status is pytest's (or check's), not grep's.
  qemu-x86_64 -cpu "$model" "$py" "$@" 2>&1 | quiet
}

start=$SECONDS
emulated Haswell -m maskops.check --quick --device cpu
emulated Haswell -m pytest -q -p no:cacheprovider --benchmark-disable tests/test_cpu_kinds.py \
  benchmarks/test_bench_suite.py::test_model_bf16_row_only_where_bfloat16_is_faster
emulated Haswell -m pytest -q -p no:cacheprovider tests/test_fuse.py -k "bfloat16 and not 256"
emulated Nehalem -m maskops.check --quick --device cpu --ops nms,roi_align
emulated Nehalem -m pytest -q -p no:cacheprovider tests/test_cpu_kinds.py
echo "test-cpu-kinds: emulated CPUs done in $(( (SECONDS - start) / 60 )) min"

echo "== AVX2 numerics (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MASKOPS_CPU_ISA=avx2)"
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MASKOPS_CPU_ISA=avx2 \
  "${pytest[@]}" tests/test_model_equivalence.py tests/test_cpu_kinds.py
echo "== scalar numerics (ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default MASKOPS_CPU_ISA=default)"
ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default MASKOPS_CPU_ISA=default \
  "${pytest[@]}" tests/test_model_equivalence.py -k "check_fails or stage_by_stage"
echo "test-cpu-kinds: all passed in $(( (SECONDS - start) / 60 )) min"
