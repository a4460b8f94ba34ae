"""The package's build metadata."""
import re

import torch

import maskops


def test_version_and_build_info():
    assert re.fullmatch(r"\d+\.\d+\.\d+", maskops.__version__)
    info = maskops.build_info()
    assert info["version"] == maskops.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["with_cuda"] == maskops.has_cuda() == info["has_cuda_kernels"]
    if info["with_cuda"]:
        assert info["cuda_arch_list"]


def test_every_op_has_a_cpu_kernel():
    for op in ("roi_align", "_roi_align_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskops::{op}", "CPU")
