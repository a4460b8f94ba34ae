#!/usr/bin/env bash
# The one-call GPU check: run as the single command of a lent GPU machine's call, from the
# repository root. Builds maskops against that machine's torch with all its cores, runs the
# whole test suite (CUDA tests included), compute-sanitizer (memcheck, racecheck) on a small
# CUDA subset, the GPU benchmarks and the scaling study, and writes logs and results under
# $OUT (default: ./gpu-check-out). The last thing it prints is a summary table.
#
# Rehearsal without a GPU (checks the script itself, not the GPU):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_SKIP_BUILD=1 GPU_CHECK_TESTS=tests/test_nms.py \
#     OUT=/tmp/rehearsal bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MASKOPS_FORCE_CUDA=1
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
QUICK=(); [ -n "${GPU_CHECK_QUICK:-}" ] && QUICK=(--quick)
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests}"
summary=()
step() { local name="$1" log="$2"; shift 2; local t0=$SECONDS
  if "$@" > "$log" 2>&1; then summary+=("| $name | ok | $((SECONDS - t0)) s |")
  else summary+=("| $name | FAILED (rc=$?, see $(basename "$log")) | $((SECONDS - t0)) s |"); fi; }

{ nvidia-smi -L 2>&1 || true; "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"; } > "$OUT/build.log" 2>&1
if [ -z "${GPU_CHECK_SKIP_BUILD:-}" ]; then
  step "build (MAX_JOBS=$MAX_JOBS)" "$OUT/build.log.tmp" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  cat "$OUT/build.log.tmp" >> "$OUT/build.log"; rm -f "$OUT/build.log.tmp"
fi
"$PY" -c "import maskops; print(maskops.build_info())" >> "$OUT/build.log" 2>&1

step "tests (${TESTS[*]}, CUDA included)" "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
tests_line=$(grep -E "passed|failed" "$OUT/tests.log" | tail -1)

if [ "$DEVICE" = cuda ] && command -v compute-sanitizer > /dev/null; then
  sel="cuda_matches_cpu or deterministic or out_of_range"
  { for tool in memcheck racecheck; do
      echo "== $tool"; compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" -m pytest -q -p no:cacheprovider -x -m cuda -k "$sel" tests/test_roi_align.py tests/test_paste_masks.py || exit 1
    done; } > "$OUT/sanitizer.log" 2>&1 && summary+=("| compute-sanitizer memcheck + racecheck | ok | |") \
    || summary+=("| compute-sanitizer memcheck + racecheck | FAILED (see sanitizer.log) | |")
else
  summary+=("| compute-sanitizer | not installed | |")
fi

step "benchmarks (python -m benchmarks --device $DEVICE ${QUICK[*]})" "$OUT/bench.log" "$PY" -m benchmarks --device "$DEVICE" "${QUICK[@]}" --out "$OUT"
step "scaling study" "$OUT/scaling.log" "$PY" -m benchmarks.scaling --device "$DEVICE" "${QUICK[@]}" --out "$OUT"
cat "$OUT/scaling.log" >> "$OUT/bench.log"; rm -f "$OUT/scaling.log"

echo
grep -A 40 "== $DEVICE: all results ==" "$OUT/bench.log" | head -45
echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
echo "| tests | ${tests_line:-no summary line} | |"
