#!/usr/bin/env bash
# `make sanitize`: builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer
# into build-sanitize/ (the normal build is untouched) and runs the op tests under it. Any
# sanitizer report fails the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="$root/build-sanitize"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
mkdir -p "$out/lib"
cd "$root"
MASKOPS_CPU_ONLY=1 MASKOPS_EXTRA_CFLAGS="$flags -O1 -g" MASKOPS_EXTRA_LDFLAGS="-fsanitize=address,undefined" \
  "$py" setup.py -q build_ext -b "$out/lib" -t "$out/tmp" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
# The Python package next to the sanitized extension; tests run from there so it is the one imported.
cp maskops/*.py "$out/lib/maskops/"
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
cd "$out/lib"
nm -D maskops/_C*.so | grep -q __asan_report || { echo "the extension is not instrumented"; exit 1; }
# Leak checking is off: CPython and torch keep allocations alive at exit by design.
LD_PRELOAD="$asan:$ubsan" \
ASAN_OPTIONS="detect_leaks=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:halt_on_error=1:abort_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  "$py" -c "import maskops, sys; assert '/build-sanitize/' in maskops.__file__, maskops.__file__"
LD_PRELOAD="$asan:$ubsan" \
ASAN_OPTIONS="detect_leaks=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:halt_on_error=1:abort_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  "$py" -m pytest -q -p no:cacheprovider -x "$@" \
    "$root/tests/test_roi_align.py" "$root/tests/test_multiscale_roi_align.py" \
    "$root/tests/test_paste_masks.py" "$root/tests/test_nms.py" "$root/tests/test_memory.py" \
    $(ls "$root"/tests/test_anchors*.py "$root"/tests/test_box*.py "$root"/tests/test_rpn*.py 2>/dev/null) \
    -k "not compile and not export"
