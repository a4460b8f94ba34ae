#!/usr/bin/env bash
# The one-command GPU check, written for a lent machine with one NVIDIA GPU (an H200, 16 cores,
# torch with CUDA 13, no network, no pycocotools) that runs a single command of at most 10
# minutes and returns at most 8 files from $OUT, no more than 2 folders deep. From the
# repository root, give that machine this one command, with a 600 s limit:
#
#     OUT="$OUT" bash benchmarks/gpu_check.sh
#
# The default plan ("quick") ends within 9 minutes whatever happens: every step runs under
# `timeout`, and step i must end by the sum of the budgets of steps 1..i, counted after a few
# seconds of machine queries (time a step leaves unused goes to the later ones; a step that
# overruns is killed, process group and all, 10 s after its TERM). Steps, budgets, logs:
#
#   build       150 s  build.log      pip install -e . (offline) with all cores (MAX_JOBS=$(nproc),
#                                     TORCH_CUDA_ARCH_LIST=9.0, MASKOPS_FORCE_CUDA=1), then
#                                     an import; 15 compile units, ~3 min on 2 cores
#   check        50 s  tests.log      python -m maskops.check --quick --json $OUT/check.json
#                                     (7 s on a 2-core CPU; on a GPU it adds half types and
#                                     the CPU-kernel comparisons)
#                                     (skipped when this tree has no maskops/check module)
#   cuda-tests   90 s  tests.log      pytest -m cuda tests: every CUDA test (about 60)
#   bench        70 s  bench.log      python -m benchmarks --quick --device cuda, with its
#                                     roofline section; the .md and .json in $OUT/results/
#   memcheck     70 s  sanitizer.log  compute-sanitizer memcheck over the CUDA tests of NMS and
#                                     RoIAlign (single- and multi-level) with
#                                     PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an access past
#                                     a tensor's end is not hidden inside a cached block
#   racecheck    40 s  sanitizer.log  compute-sanitizer racecheck over the CUDA tests of every
#                                     op, instrumenting maskops' own kernels only
#                                     (--kernel-name kns=maskops: they all live in namespace
#                                     maskops, so the substring is in every mangled name)
#   op-tests     50 s  tests.log      the CPU tests of the op files, without torch.compile /
#                                     export (CI runs all of them; last, as nothing here is
#                                     GPU-specific)
# That is 520 s of budgets. The sanitizer steps stop at the first failing test (-x).
#
# GPU_CHECK_PLAN=full is the second plan, full-size benchmarks, for a lease of its own (it
# does not fit beside the quick plan in 15 minutes of device time): build 150 s, bench-full
# 230 s (python -m benchmarks --device cuda: every op and the model), scaling 140 s (python
# -m benchmarks.scaling --device cuda: JSON + plot). One more step belongs to neither plan:
# synccheck (60 s, as racecheck with compute-sanitizer's synccheck).
#
# Every step runs and is reported even when an earlier one failed. The last thing printed,
# also written to $OUT/summary.md, is a table of every step: ok, FAILED (exit code; 124 is a
# timeout), or skipped (why), with its time in seconds and a line of detail (pytest's counts,
# the sanitizer's error summary). An error in this script or an INT/TERM still prints it.
# Exit code: 0 when no step failed (skipped steps included); 1 when a step failed, timed out
# or was left without time; 2 for bad settings (nothing run); 130/143 after INT/TERM.
#
# Under $OUT (default ./build-gpu-check): summary.md, build.log, tests.log, sanitizer.log,
# bench.log, check.json and results/ with the benchmark tables: 8 files at most with the
# quick plan, 7 with the full one. Should more be there, results/ is packed into
# results.tar.gz, then if need be everything but summary.md into gpu-check.tar.gz; a log over
# 15 MiB keeps its first 2 and last 6 MiB. This script's files from an earlier run are
# replaced.
#
# Settings (environment):
#   PYTHON               interpreter (default: python3)
#   GPU_CHECK_PLAN       quick (default) or full
#   GPU_CHECK_STEPS      comma-separated steps to run instead of the plan's (they run in the
#                        order above), e.g. GPU_CHECK_STEPS=memcheck,racecheck
#   GPU_CHECK_BUDGETS    budget changes in seconds, e.g. build=240,op-tests=30
#   GPU_CHECK_SKIP_BUILD non-empty: use the maskops already built (build reported as skipped)
#   GPU_CHECK_TESTS      test paths or node ids for every pytest step, instead of each one's own
#   GPU_CHECK_BENCH_ONLY passed to the benchmarks as --only (e.g. nms,roi_align)
#   GPU_CHECK_QUICK      non-empty: small sizes for bench-full and scaling too
#   GPU_CHECK_DEVICE     cuda (default) or cpu: a rehearsal without a GPU, where the sanitizer
#                        steps are "skipped (no GPU)" and the rest runs on the CPU
#   GPU_CHECK_FAIL_STEP  comma-separated steps that fail on purpose (exit code 3, their command
#                        not run), or hang with NAME:hang (until their timeout), to show that
#                        the later steps and the summary still come
#
# Rehearsal without a GPU (checks this script, not the GPU; about a minute on 2 cores):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP_BUILD=1 GPU_CHECK_TESTS=tests/test_nms.py \
#     GPU_CHECK_BENCH_ONLY=nms OUT=/tmp/rehearsal bash benchmarks/gpu_check.sh
# benchmarks/test_gpu_check.py rehearses it with a failing and a hanging step on `make test`.
set -uo pipefail   # no -e: a failing step is recorded, it never ends the run

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/build-gpu-check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "gpu_check: cannot create OUT=$OUT"; exit 2; }
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PLAN="${GPU_CHECK_PLAN:-quick}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
[ "$DEVICE" = cuda ] && export MASKOPS_FORCE_CUDA=1   # a build without the CUDA kernels is an error
MAX_FILES=8
LOGS=(summary.md build.log tests.log sanitizer.log bench.log check.json results results.tar.gz gpu-check.tar.gz)

# Steps in the order they run, and their budgets (seconds). Each plan's budgets add up to 520 s.
ORDER=(build check cuda-tests bench memcheck racecheck op-tests bench-full scaling synccheck)
declare -A BUDGET=([build]=150 [check]=50 [cuda-tests]=90 [bench]=70 [memcheck]=70 [racecheck]=40
                   [op-tests]=50 [bench-full]=230 [scaling]=140 [synccheck]=60)
declare -A LOG=([build]=build.log [check]=tests.log [cuda-tests]=tests.log [op-tests]=tests.log
                [bench]=bench.log [bench-full]=bench.log [scaling]=bench.log
                [memcheck]=sanitizer.log [racecheck]=sanitizer.log [synccheck]=sanitizer.log)
case "$PLAN" in
  quick) plan_steps="build,check,cuda-tests,bench,memcheck,racecheck,op-tests" ;;
  full) plan_steps="build,bench-full,scaling" ;;
  *) echo "gpu_check: GPU_CHECK_PLAN must be quick or full, not '$PLAN'"; exit 2 ;;
esac
wanted=",${GPU_CHECK_STEPS:-$plan_steps},"
failing=",${GPU_CHECK_FAIL_STEP:-},"
hanging=",$(tr ',' '\n' <<< "${GPU_CHECK_FAIL_STEP:-}" | sed -n 's/:hang$//p' | paste -sd,),"
failing="${failing//:hang,/,}"
for name in ${wanted//,/ } ${failing//,/ }; do
  [ -n "${BUDGET[$name]:-}" ] || { echo "gpu_check: unknown step '$name' (steps: ${ORDER[*]})"; exit 2; }
done
budgets="${GPU_CHECK_BUDGETS:-}"
for pair in ${budgets//,/ }; do
  name="${pair%%=*}" secs="${pair#*=}"
  [[ -n "${BUDGET[$name]:-}" && "$secs" =~ ^[0-9]+$ ]] || { echo "gpu_check: bad GPU_CHECK_BUDGETS entry '$pair'"; exit 2; }
  BUDGET[$name]=$secs
done
STEPS=()
for name in "${ORDER[@]}"; do [[ "$wanted" == *",$name,"* ]] && STEPS+=("$name"); done

OP_TESTS=(tests/test_roi_align.py tests/test_multiscale_roi_align.py tests/test_nms.py
          tests/test_paste_masks.py tests/test_box_coder.py tests/test_anchors.py tests/test_rpn_proposals.py)
MEMCHECK_TESTS=(tests/test_nms.py tests/test_roi_align.py tests/test_multiscale_roi_align.py)
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -r -a custom <<< "$GPU_CHECK_TESTS"
  ALL_TESTS=("${custom[@]}") OP_TESTS=("${custom[@]}") MEMCHECK_TESTS=("${custom[@]}")
else
  ALL_TESTS=(tests)
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
QUICK=(--quick); [ -z "${GPU_CHECK_QUICK:-}" ] && QUICK=()
ONLY=(); [ -n "${GPU_CHECK_BENCH_ONLY:-}" ] && ONLY=(--only "$GPU_CHECK_BENCH_ONLY")
SANITIZER="$(command -v compute-sanitizer || true)"
nvcc_home="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /none/bin/nvcc)")")")"
for dir in "${CUDA_HOME:-}" "$nvcc_home" /usr/local/cuda; do
  [ -z "$SANITIZER" ] && [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ] && SANITIZER="$dir/bin/compute-sanitizer"
done
# --report-api-errors no: torch probes the driver with calls that may fail by design; a real
# API error in maskops already fails its test (every launch is checked).
SANITIZE=("$SANITIZER" --error-exitcode 99 --print-limit 100 --report-api-errors no)

# Files of an earlier run are replaced (only this script's own names are removed).
for f in "${LOGS[@]}"; do rm -rf "${OUT:?}/$f"; done

# ---- bookkeeping: status of every step, the summary, the limits on what comes back
declare -A STATUS TIME DETAIL STARTED
FAILED=0 CHILD="" CURRENT="" STEP_OUT="" FINISHED="" STEP_T0=0 DEADLINE=0 TOTAL_BUDGET=0
MACHINE="unknown (see build.log)"

limits_ok() {   # the files under $OUT (summary.md excluded) fit what comes back
  local n bad
  n=$(find "$OUT" -type f ! -path "$OUT/summary.md" | wc -l)
  bad=$(cd "$OUT" && find . -mindepth 1 | sed 's|^\./||' | grep -Ev '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$')
  [ "$n" -le $((MAX_FILES - 1)) ] && [ -z "$bad" ] && [ -z "$(find "$OUT" -mindepth 1 ! -type f ! -type d)" ]
}

enforce_limits() {
  local f tmp
  # A file over 16 MiB would not come back: keep the first 2 and the last 6 MiB of a big log.
  while IFS= read -r f; do
    tmp="$(mktemp)"; { head -c 2M "$f"; printf '\n[... cut to fit 16 MiB ...]\n'; tail -c 6M "$f"; } > "$tmp" && mv "$tmp" "$f"
  done < <(find "$OUT" -type f -name '*.log' -size +15M)
  limits_ok && return
  if [ -d "$OUT/results" ]; then
    tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
    NOTE="results/ packed into results.tar.gz (over $MAX_FILES files)"
  fi
  limits_ok && return
  tmp="$(mktemp)"
  tar -czf "$tmp" -C "$OUT" --exclude=./summary.md . && find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.md -exec rm -rf {} + \
    && mv "$tmp" "$OUT/gpu-check.tar.gz"
  NOTE="every result packed into gpu-check.tar.gz (over the limits on files returned)"
}

finish() {
  local rc=$? s log
  [ -n "$FINISHED" ] && return
  FINISHED=1
  trap - INT TERM
  if [ -n "$CURRENT" ]; then   # stopped inside a step
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
    [ -n "$STEP_OUT" ] && [ -f "$STEP_OUT" ] && cat "$STEP_OUT" >> "$OUT/${LOG[$CURRENT]}" && rm -f "$STEP_OUT"
    STATUS[$CURRENT]="FAILED (interrupted)" TIME[$CURRENT]=$((SECONDS - STEP_T0)) FAILED=1
  fi
  for s in "${STEPS[@]}"; do
    [ -n "${STATUS[$s]:-}" ] || { STATUS[$s]="not run (the script stopped, exit code $rc)"; FAILED=1; }
  done
  NOTE=""
  enforce_limits
  local code=0 files summary
  [ "$FAILED" = 1 ] && code=1
  [ "$rc" -ge 128 ] && code=$rc
  files="$(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
  summary="$(mktemp)"
  {
    echo "# gpu_check summary"
    echo
    echo "- machine: $MACHINE"
    echo "- plan: $PLAN, steps ${STEPS[*]} (device $DEVICE); $SECONDS s of $TOTAL_BUDGET s; exit code $code"
    echo "- files in \$OUT: ${files}summary.md"
    [ -n "$NOTE" ] && echo "- $NOTE"
    echo
    echo "| step | status | time (s) | budget (s) | log | detail |"
    echo "|---|---|---|---|---|---|"
    for s in "${STEPS[@]}"; do
      log=""; [ -n "${STARTED[$s]:-}" ] && log="${LOG[$s]}"
      echo "| $s | ${STATUS[$s]} | ${TIME[$s]:-0} | ${BUDGET[$s]} | $log | ${DETAIL[$s]:-} |"
    done
  } > "$summary"
  mv "$summary" "$OUT/summary.md" && chmod 644 "$OUT/summary.md"
  echo
  cat "$OUT/summary.md"
  exit "$code"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

detail_of() {   # one telling line of a step's output
  local f="$1"
  grep -hE "(ERROR|RACECHECK|SYNCCHECK) SUMMARY" "$f" | tail -1 | tr -d '=' | sed 's/^ *//'
  grep -hE "^=*\s*[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran|^\[FAIL\]|^(OK|FAILED|FAIL|ERROR): " "$f" | tail -1 | tr -d '=|' | sed 's/^ *//;s/ *$//'
}

# run_step NAME COMMAND...: runs it under the step's deadline, records status, time and detail.
run_step() {
  local name="$1"; shift
  local log="$OUT/${LOG[$name]}" left rc reason=""
  DEADLINE=$((DEADLINE + ${BUDGET[$name]}))
  if [[ "$hanging" == *",$name,"* ]]; then
    set -- bash -c 'echo "this step hangs on purpose (GPU_CHECK_FAIL_STEP)"; exec sleep 3600'
  elif [[ "$failing" == *",$name,"* ]]; then
    set -- bash -c 'echo "this step fails on purpose (GPU_CHECK_FAIL_STEP)"; exit 3'
  else
    reason="$(skip_reason "$name")"
  fi
  if [ -n "$reason" ]; then
    STATUS[$name]="skipped ($reason)" TIME[$name]=0
    echo "== $name: skipped ($reason)"
    return
  fi
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 5 ]; then
    STATUS[$name]="skipped (no time left)" TIME[$name]=0 FAILED=1
    echo "== $name: skipped, no time left"
    return
  fi
  echo "== $name (timeout ${left} s): $(show "$@")"
  printf '\n===== %s (timeout %s s): %s\n' "$name" "$left" "$(show "$@")" >> "$log"
  STEP_OUT="$(mktemp)" STEP_T0=$SECONDS CURRENT="$name" STARTED[$name]=1
  # In the background and waited for, so that INT/TERM reach the trap at once. Without
  # --foreground, timeout signals the whole process group (compute-sanitizer's target too).
  timeout -k 10 "$left" "$@" < /dev/null > "$STEP_OUT" 2>&1 &
  CHILD=$!
  wait "$CHILD"; rc=$?
  CHILD=""
  TIME[$name]=$((SECONDS - STEP_T0))
  cat "$STEP_OUT" >> "$log"
  DETAIL[$name]="$(detail_of "$STEP_OUT" | paste -sd ';' | sed 's/;/; /g')"
  if [ "$rc" = 0 ]; then
    STATUS[$name]=ok
  elif [ "$rc" = 5 ] && [[ " $* " == *" pytest "* ]]; then   # pytest: no test selected
    STATUS[$name]="skipped (no tests selected)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    STATUS[$name]="FAILED ($rc, timed out after $left s)" FAILED=1
  else
    STATUS[$name]="FAILED ($rc)" FAILED=1
  fi
  printf '===== %s: exit code %s after %s s\n' "$name" "$rc" "${TIME[$name]}" >> "$log"
  echo "== $name: ${STATUS[$name]} in ${TIME[$name]} s"
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then sed 's/^/   | /' "$STEP_OUT" | tail -15; fi
  rm -f "$STEP_OUT"; STEP_OUT="" CURRENT=""
}

show() {   # a command line for the eye (arguments with spaces or quotes in single quotes)
  local a line=""
  for a in "$@"; do [[ "$a" =~ [[:space:]\"\'\$] ]] && a="'$a'"; line+="$a "; done
  echo "${line% }"
}

skip_reason() {
  case "$1" in
    build) [ -n "${GPU_CHECK_SKIP_BUILD:-}" ] && echo "GPU_CHECK_SKIP_BUILD is set" ;;
    check) [ -f maskops/check.py ] || [ -f maskops/check/__init__.py ] || echo "no maskops.check module in this tree" ;;
    memcheck | racecheck | synccheck)
      if [ "$DEVICE" != cuda ]; then echo "no GPU"
      elif [ -z "$SANITIZER" ]; then echo "compute-sanitizer not found"; fi ;;
  esac
  return 0
}

for s in "${STEPS[@]}"; do TOTAL_BUDGET=$((TOTAL_BUDGET + ${BUDGET[$s]})); done
echo "gpu_check: plan $PLAN, steps ${STEPS[*]}, device $DEVICE, budget $TOTAL_BUDGET s, OUT=$OUT"

# ---- the machine, at the top of build.log (read-only queries; never changes the card's settings)
{
  echo "===== machine"
  timeout 10 nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 || true
  [ -n "$SANITIZER" ] && timeout 10 "$SANITIZER" --version 2>&1 | tail -2
  echo "compute-sanitizer: ${SANITIZER:-not found}; MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} > "$OUT/build.log" 2>&1
MACHINE="$(timeout 30 "$PY" - 2>>"$OUT/build.log" <<'EOF'
import os, platform, sys
import torch
try:
    import torchvision
    tv = torchvision.__version__
except Exception:
    tv = "missing"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible to torch"
print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {tv}, "
      f"python {platform.python_version()}, {os.cpu_count()} CPUs")
try:
    import maskops
    print("maskops before the build step:", maskops.build_info(), file=sys.stderr)
except Exception as e:
    print(f"maskops not importable before the build step: {e}", file=sys.stderr)
EOF
)" || MACHINE="unknown (see build.log)"
echo "machine: $MACHINE" | tee -a "$OUT/build.log"
DEADLINE=$SECONDS   # the steps' budgets count from here

# ---- the steps
for step in "${STEPS[@]}"; do
  case "$step" in
    build)
      run_step build bash -c '"$0" -m pip install --no-index --no-build-isolation --no-deps -v -e . && "$0" -c "import maskops; print(maskops.build_info())"' "$PY" ;;
    check)
      run_step check "$PY" -m maskops.check --quick --device "$DEVICE" --json "$OUT/check.json" ;;
    cuda-tests)
      run_step cuda-tests "${PYTEST[@]}" -m cuda "${ALL_TESTS[@]}" ;;
    op-tests)
      run_step op-tests "${PYTEST[@]}" -m "not cuda" -k "not compile and not export" "${OP_TESTS[@]}" ;;
    bench)
      run_step bench "$PY" -m benchmarks --quick --device "$DEVICE" "${ONLY[@]}" --out "$OUT/results" ;;
    bench-full)
      run_step bench-full "$PY" -m benchmarks --device "$DEVICE" "${QUICK[@]}" "${ONLY[@]}" --out "$OUT/results" ;;
    scaling)
      run_step scaling "$PY" -m benchmarks.scaling --device "$DEVICE" "${QUICK[@]}" --out "$OUT/results" ;;
    memcheck)
      run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZE[@]}" --tool memcheck \
        "${PYTEST[@]}" -x -m cuda "${MEMCHECK_TESTS[@]}" ;;
    racecheck | synccheck)
      run_step "$step" "${SANITIZE[@]}" --tool "$step" --kernel-name kns=maskops \
        "${PYTEST[@]}" -x -m cuda "${OP_TESTS[@]}" ;;
  esac
done

# The benchmark table, before the summary (the summary comes last).
if [ -f "$OUT/bench.log" ]; then
  echo
  sed -n "/== $DEVICE: all results ==/,/^written to /p" "$OUT/bench.log" | head -60
fi
exit 0   # the EXIT trap prints the summary and sets the exit code
