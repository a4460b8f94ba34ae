#!/usr/bin/env bash
# The one-call GPU check: run as the single command of a lent GPU machine's call, from the
# repository root. Builds maskops against that machine's torch with all its cores, runs the
# whole test suite (CUDA tests included), compute-sanitizer (memcheck, racecheck) on a small
# CUDA subset, the GPU benchmarks and the scaling study, and writes logs and results under
# $OUT (default: ./gpu-check-out). The last thing it prints is a summary table.
#
# A device call is limited to 10 minutes: if the whole run does not fit, split it over calls
# on the same warm machine with GPU_CHECK_STEPS (a subset of build,tests,sanitizer,bench,scaling;
# default all), e.g. GPU_CHECK_STEPS=build,tests then GPU_CHECK_STEPS=sanitizer,bench,scaling.
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
STEPS=",${GPU_CHECK_STEPS:-build,tests,sanitizer,bench,scaling},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
summary=()
step() { local name="$1" log="$2"; shift 2; local t0=$SECONDS
  if "$@" > "$log" 2>&1; then summary+=("| $name | ok | $((SECONDS - t0)) s |")
  else summary+=("| $name | FAILED (rc=$?, see $(basename "$log")) | $((SECONDS - t0)) s |"); fi; }

{ nvidia-smi -L 2>&1 || true; "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"; } > "$OUT/build.log" 2>&1
if [ -z "${GPU_CHECK_SKIP_BUILD:-}" ] && want build; then
  step "build (MAX_JOBS=$MAX_JOBS)" "$OUT/build.log.tmp" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  cat "$OUT/build.log.tmp" >> "$OUT/build.log"; rm -f "$OUT/build.log.tmp"
fi
"$PY" -c "import maskops; print(maskops.build_info())" >> "$OUT/build.log" 2>&1

tests_line=""
if want tests; then
  step "tests (${TESTS[*]}, CUDA included)" "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  tests_line=$(grep -E "passed|failed" "$OUT/tests.log" | tail -1)
fi

# Every kernel under memcheck, racecheck (NMS is the one with shared memory) and synccheck,
# through the small CUDA tests of each op (the model test is left out: too slow there).
if ! want sanitizer; then :
elif [ "$DEVICE" = cuda ] && command -v compute-sanitizer > /dev/null; then
  { for tool in memcheck racecheck synccheck; do
      echo "== $tool"; compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" -m pytest -q -p no:cacheprovider -x -m cuda -k "not memory_stays_flat" \
          tests/test_roi_align.py tests/test_multiscale_roi_align.py tests/test_paste_masks.py \
          tests/test_nms.py tests/test_box_coder.py tests/test_anchors.py tests/test_rpn_proposals.py \
        || exit 1
    done; } > "$OUT/sanitizer.log" 2>&1 && summary+=("| compute-sanitizer memcheck + racecheck + synccheck | ok | |") \
    || summary+=("| compute-sanitizer memcheck + racecheck + synccheck | FAILED (see sanitizer.log) | |")
else
  summary+=("| compute-sanitizer | not installed (or no GPU) | |")
fi

if want bench; then
  step "benchmarks (python -m benchmarks --device $DEVICE ${QUICK[*]})" "$OUT/bench.log" "$PY" -m benchmarks --device "$DEVICE" "${QUICK[@]}" --out "$OUT"
fi
if want scaling; then
  step "scaling study" "$OUT/scaling.log" "$PY" -m benchmarks.scaling --device "$DEVICE" "${QUICK[@]}" --out "$OUT"
  cat "$OUT/scaling.log" >> "$OUT/bench.log"; rm -f "$OUT/scaling.log"
fi

echo
[ -f "$OUT/bench.log" ] && grep -A 40 "== $DEVICE: all results ==" "$OUT/bench.log" | head -45
echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
want tests && echo "| tests | ${tests_line:-no summary line} | |"
exit 0
