"""Builds maskops._C, one torch extension from csrc/.

CUDA sources are compiled when nvcc is found (MASKOPS_CPU_ONLY=1 skips them,
MASKOPS_FORCE_CUDA=1 makes a missing CUDA toolkit an error). Everything a CUDA
build needs on a machine without a GPU is worked out here and printed.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def log(msg):
    print(f"maskops setup: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """A CUDA toolkit folder: bin/nvcc plus the runtime headers (nvcc on PATH may be a wrapper)."""

    def ok(home):
        return (
            bool(home)
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
        )

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if ok(home):
            return home
    return None


def nvidia_wheel_includes():
    """Include folders of pip's nvidia-* wheels (torch's CUDA headers include cusparse.h etc.)."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def decide_cuda():
    cpu_only = os.environ.get("MASKOPS_CPU_ONLY", "0") == "1"
    force = os.environ.get("MASKOPS_FORCE_CUDA", "0") == "1"
    if cpu_only and force:
        raise RuntimeError("MASKOPS_CPU_ONLY=1 and MASKOPS_FORCE_CUDA=1 contradict each other")
    if cpu_only:
        log("MASKOPS_CPU_ONLY=1: building the CPU-only extension")
        return None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if force:
            raise RuntimeError("MASKOPS_FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        log("no nvcc found: building the CPU-only extension")
        return None
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    import torch

    if torch.version.cuda is None:
        if force:
            raise RuntimeError("MASKOPS_FORCE_CUDA=1 but this torch is a CPU-only build")
        log(f"nvcc found in {cuda_home} but torch {torch.__version__} has no CUDA: CPU-only build")
        return None
    log(f"CUDA_HOME={cuda_home} (torch built with CUDA {torch.version.cuda})")
    extra = nvidia_wheel_includes()
    if extra:
        cpath = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
        os.environ["CPATH"] = os.pathsep.join(cpath + [d for d in extra if d not in cpath])
        log(f"CPATH += {', '.join(extra)}")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            log("TORCH_CUDA_ARCH_LIST unset: torch targets the visible GPUs")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            log("no GPU visible: TORCH_CUDA_ARCH_LIST=9.0 (H100/H200)")
    else:
        log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return cuda_home


def nvcc_version(cuda_home):
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_build_info(with_cuda, cuda_home):
    import torch

    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "with_cuda": bool(with_cuda),
        "cuda": torch.version.cuda if with_cuda else None,
        "nvcc": nvcc_version(cuda_home) if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(ROOT, "maskops", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def extensions():
    cuda_home = decide_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None
    write_build_info(with_cuda, cuda_home)
    sources = (
        ["csrc/maskops.cpp"]
        + sorted(glob.glob("csrc/common/*.cpp"))
        + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    )
    # -fopenmp: at::parallel_for is an inline OpenMP region; without it the CPU kernels run
    # on one thread.
    # (py_limited_api=True makes torch define Py_LIMITED_API; -Wno-psabi silences GCC's note
    # that 64-byte vector arguments change the ABI, irrelevant to internal functions.)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-psabi"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("MASKOPS_EXTRA_CFLAGS"):  # used by `make sanitize`
        cxx += os.environ["MASKOPS_EXTRA_CFLAGS"].split()
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True)
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        ext = CUDAExtension(
            "maskops._C",
            sources,
            extra_compile_args={
                "cxx": cxx + ["-DMASKOPS_WITH_CUDA"],
                "nvcc": nvcc + ["-DMASKOPS_WITH_CUDA"],
            },
            **kwargs,
        )
    else:
        ext = CppExtension("maskops._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    ext.extra_link_args += ["-fopenmp"]
    if os.environ.get("MASKOPS_EXTRA_LDFLAGS"):
        ext.extra_link_args += os.environ["MASKOPS_EXTRA_LDFLAGS"].split()
    log(
        f"{'CUDA' if with_cuda else 'CPU-only'} build of {len(sources)} sources, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="maskops",
    version=VERSION,
    description="Fast, dependable C++/CUDA ops for Mask R-CNN: RoIAlign, NMS, anchors, mask paste",
    packages=find_packages(include=["maskops", "maskops.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
