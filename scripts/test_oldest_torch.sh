#!/usr/bin/env bash
# `make test-oldest-torch`: the test suite on the oldest torch maskops supports, 2.11.0 with
# torchvision 0.26.0 (the versions on the project's GPU machines), beside the usual 2.14.1.
# A venv of its own (.venv-torch<version>, ~5 GB, downloaded once), a copy of this working
# tree in build-oldest-torch/ (so the extension built there for that torch does not replace
# this tree's), the extension built with its CUDA sources when nvcc is found, then pytest.
# Not part of `make test`: it downloads torch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
torch_version="${TORCH_VERSION:-2.11.0}"
vision_version="${TORCHVISION_VERSION:-0.26.0}"
venv="$root/.venv-torch$torch_version"
copy="$root/build-oldest-torch"
py="$venv/bin/python"
cd "$root"
if [ ! -f "$venv/.deps-installed" ]; then
  "${PY:-python3}" -m venv "$venv"
  "$py" -m pip install -q "torch==$torch_version" "torchvision==$vision_version" numpy pybind11 \
    ninja pytest pytest-benchmark hypothesis pycocotools "setuptools<82" wheel build matplotlib \
    tqdm onnxruntime==1.32.0 onnxscript==0.7.2
  touch "$venv/.deps-installed"
fi
rm -rf "$copy" && mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$copy"
cd "$copy"
MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install --no-build-isolation --no-deps -v -e . > build.log 2>&1 \
  || { tail -60 build.log; exit 1; }
"$py" -c "import maskops, torch; print('maskops on torch', torch.__version__, maskops.build_info())"
OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" "$py" -m pytest -q tests benchmarks --benchmark-disable "$@"
