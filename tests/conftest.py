import importlib.util
import os
import shutil
import tempfile

import pytest
import torch

# The data, training, evaluation and DDP suites read COCO-format data through pycocotools,
# which some machines (the lent GPU machines) lack: there they are left out, and the header
# of the run says so, rather than the whole run stopping at collection.
NEEDS_PYCOCOTOOLS = ["test_data.py", "test_ddp.py", "test_evaluate.py", "test_train.py"]
HAVE_PYCOCOTOOLS = importlib.util.find_spec("pycocotools") is not None
collect_ignore = [] if HAVE_PYCOCOTOOLS else NEEDS_PYCOCOTOOLS


def pytest_configure(config):
    # torch.compile and AOTInductor write compiled code (~0.5 GB for this suite) to a cache
    # that nothing prunes (/tmp/torchinductor_<user>): this run gets a folder of its own,
    # subprocesses included, removed at the end. (Inductor's precompiled headers, ~0.3 GB a
    # torch version, stay in the default folder: their path is fixed when torch is imported.)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        config._inductor_cache = tempfile.mkdtemp(prefix="maskops-tests-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._inductor_cache


def pytest_unconfigure(config):
    folder = getattr(config, "_inductor_cache", None)
    if folder:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def pytest_report_header(config):
    from maskops import cpu

    lines = [f"cpu: {cpu.features().summary()}"]
    if not HAVE_PYCOCOTOOLS:
        lines.append(f"pycocotools is not installed: left out {', '.join(NEEDS_PYCOCOTOOLS)}")
    # A run held at most ~0.7 GB in the temporary folder at once (~1 GB with Inductor's
    # headers): "No space left on device" in a test is then the machine's, as this line shows.
    tmp = tempfile.gettempdir()
    free_gb = shutil.disk_usage(tmp).free / 2**30
    lines.append(
        f"free disk in {tmp}: {free_gb:.1f} GiB"
        + (" (under 1.5 GiB: the suite holds up to ~1 GiB at once)" if free_gb < 1.5 else "")
    )
    return lines


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def no_tf32():
    """CUDA results are compared with CPU ones: TF32 convolutions and matmuls (10-bit
    mantissas) would differ from float32 far beyond rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def rng():
    """A fresh, seeded generator per test (different tests see different inputs)."""
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    return g
