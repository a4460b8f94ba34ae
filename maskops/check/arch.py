"""GPU architectures: whether the CUDA kernels of this build run on a card, and what to
say when they do not (before any CUDA call that would fail with "no kernel image")."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch

import maskops

from .report import first_line

# TORCH_CUDA_ARCH_LIST's named architectures, as torch.utils.cpp_extension expands them.
_NAMED_ARCHES = {
    "kepler+tesla": "3.7",
    "kepler": "3.5+PTX",
    "maxwell+tegra": "5.3",
    "maxwell": "5.0;5.2+PTX",
    "pascal": "6.0;6.1+PTX",
    "volta+tegra": "7.2",
    "volta": "7.0+PTX",
    "turing": "7.5+PTX",
    "ampere+tegra": "8.7",
    "ampere": "8.0;8.6+PTX",
    "ada": "8.9+PTX",
    "hopper": "9.0+PTX",
}


def parse_arch_list(arch_list: str) -> List[Tuple[int, int, str, bool]]:
    """``"8.0;8.6+PTX 9.0a"`` -> ``[(8, 0, "", False), (8, 6, "", True), (9, 0, "a", False)]``
    (major, minor, suffix "a"/"f"/"", PTX). Entries that are not architectures are ignored."""
    out = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        expanded = _NAMED_ARCHES.get(entry.lower())
        if expanded:
            out += parse_arch_list(expanded)
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+ptx)?", entry, re.IGNORECASE)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), m.group(3).lower(), bool(m.group(4))))
    return out


def arch_runs_on(arch_list: Optional[str], capability: Tuple[int, int]) -> Optional[bool]:
    """Whether kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax) run on a GPU of
    compute capability ``capability``; None when the list is unknown or empty.

    Machine code for X.y runs on X.z with z >= y (an "a" build, e.g. 9.0a, only on X.y
    itself); PTX ("+PTX") for X.y is compiled by the driver for any capability >= X.y.
    """
    entries = parse_arch_list(arch_list) if arch_list else []
    if not entries:
        return None
    major, minor = capability
    for a_major, a_minor, suffix, ptx in entries:
        if suffix == "a":
            if (a_major, a_minor) == (major, minor):
                return True
            continue
        if a_major == major and a_minor <= minor:
            return True
        if ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


def arch_mismatch_message(
    device: str, name: str, capability: Tuple[int, int], arch_list: Optional[str]
) -> str:
    cap = "%d.%d" % capability
    built = (
        f'TORCH_CUDA_ARCH_LIST="{arch_list}"'
        if arch_list
        else "the GPUs visible when it was built (the list was not recorded)"
    )
    wider = f"{arch_list};{cap}" if arch_list else f"8.0;{cap}"
    return (
        f"{device} ({name}) has compute capability {cap} (sm_{capability[0]}{capability[1]}), "
        f"but this maskops build has CUDA kernels for {built}, which this card cannot run. "
        f"Rebuild maskops for it, from the maskops source folder: "
        f'TORCH_CUDA_ARCH_LIST="{cap}" pip install --no-build-isolation .  '
        f'(for several kinds of GPU list them all, e.g. TORCH_CUDA_ARCH_LIST="{wider}"; '
        f"unset, the build targets the GPUs it can see)."
    )


def _probe(device: str) -> None:
    """A first, tiny maskops kernel on ``device``, waited for."""
    torch.ops.maskops.box_area(torch.ones(1, 4, device=device))
    torch.cuda.synchronize(device)


def cuda_device_problem(index: int, info: Optional[dict] = None, probe=True) -> Optional[str]:
    """Why maskops' CUDA kernels cannot run on ``cuda:index``, or None if they can.

    Checks, in order: that CUDA kernels were compiled at all, that the card's compute
    capability is in the compiled arch list, and (``probe``: True, or a function of the
    device name that runs a kernel) that a first small kernel runs.
    """
    info = maskops.build_info() if info is None else info
    device = f"cuda:{index}"
    if not info.get("has_cuda_kernels"):
        return (
            f"{device} is present but this maskops build has no CUDA kernels (it was built "
            "without the CUDA toolkit, or with MASKOPS_CPU_ONLY=1). Rebuild on a machine with "
            "nvcc: pip install --no-build-isolation .  (MASKOPS_FORCE_CUDA=1 makes a missing "
            "toolkit an error); or check the CPU only: --device cpu."
        )
    capability = tuple(torch.cuda.get_device_capability(index))
    name = torch.cuda.get_device_name(index)
    arch_list = info.get("cuda_arch_list")
    if arch_runs_on(arch_list, capability) is False:
        return arch_mismatch_message(device, name, capability, arch_list)
    if probe:
        try:
            (_probe if probe is True else probe)(device)
        except Exception as e:  # noqa: BLE001 - any failure here is the answer
            if "no kernel image" in str(e) or "invalid device function" in str(e):
                return arch_mismatch_message(device, name, capability, arch_list)
            return f"a first maskops CUDA kernel failed on {device} ({name}): {first_line(e)}"
    return None
