# maskops: `make test` and `make demo` are all a user needs; both set up .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.deps-installed
BUILT   := $(VENV)/.maskops-built
CSRC    := $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu)
SOURCES := setup.py $(CSRC)
DEPS    := torch==2.14.1 torchvision==0.29.1 numpy pybind11 ninja pytest pytest-benchmark pytest-xdist \
           hypothesis pycocotools setuptools wheel build matplotlib tqdm \
           onnxruntime==1.32.0 onnxscript==0.7.2
# The linters, pinned: a new release may flag or reformat code the pinned one accepts.
LINT_DEPS := ruff==0.17.6 clang-format==23.1.5
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: test demo demo-ops bench build wheel clean venv sanitize test-oldest-torch test-cpu-kinds \
        lint format

venv: $(STAMP)
$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q $(DEPS)
	touch $@

# Builds CUDA sources too when nvcc is found (see setup.py); MAX_JOBS bounds parallel jobs.
$(BUILT): $(STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -v -e . > build.log 2>&1 || { tail -60 build.log; exit 1; }
	grep "maskops setup" build.log || true
	$(VPY) -c "import maskops; print('maskops', maskops.__version__, maskops.build_info())"
	touch $@

build: $(BUILT)

# Lint needs neither torch nor the build: its own stamp, so that it runs first and fast.
$(LINT_STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q $(LINT_DEPS)
	touch $@

# Python: ruff's lint rules and format (pyproject.toml); csrc/: .clang-format. Fails on any
# finding, changes nothing.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

# Applies what `make lint` checks: ruff's safe fixes (import order, ...), then both formatters.
format: $(LINT_STAMP)
	$(VENV)/bin/ruff check --fix-only .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC)

# Two workers, each taking whole test files (a file's fixtures are built once); waiting OpenMP
# threads sleep rather than spin, so that the workers' threads share the cores.
TEST_WORKERS ?= 2
test: $(BUILT)
	$(VPY) -c "import xdist" 2>/dev/null || $(PIP) install -q pytest-xdist  # (venvs made before it)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests benchmarks --benchmark-disable

# The CPU-dependent tests on emulated CPUs (AVX2 without AVX-512 or native bf16; no AVX) and
# the model-size equivalence tests under AVX2 and scalar numerics (scripts/test_cpu_kinds.sh).
test-cpu-kinds: $(BUILT)
	bash scripts/test_cpu_kinds.sh

# The main job: synthetic data, CPU training, evaluation, a prediction image, the pipeline trace.
demo: $(BUILT)
	$(VPY) -m tools.demo --out demo_out

# maskops and torchvision RoIAlign side by side (same result, the speed-up).
demo-ops: $(BUILT)
	$(VPY) examples/roi_align_demo.py

bench: $(BUILT)
	$(VPY) -m benchmarks

# ASan + UBSan build of the CPU kernels in build-sanitize/, then the op tests under it.
sanitize: $(STAMP)
	bash scripts/sanitize.sh

# The test suite on torch 2.11.0 + torchvision 0.26.0 (own venv, ~5 GB downloaded once, and a
# copy of the tree in build-oldest-torch/); not part of `make test`.
test-oldest-torch:
	bash scripts/test_oldest_torch.sh

wheel: $(STAMP)
	$(VPY) -m build --wheel --no-isolation

clean:
	rm -rf build build-sanitize build-oldest-torch dist *.egg-info maskops/_C*.so maskops/_build_info.py $(BUILT)
