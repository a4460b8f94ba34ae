"""What a measurement ran on: the one machine record of the self-check and the benchmarks,
built on :mod:`maskops.cpu` (which alone asks the CPU)."""

from __future__ import annotations

import torch

from maskops import cpu


def machine() -> dict:
    """The CPU record of :mod:`maskops.cpu` (the SIMD level maskops' kernels ran at, torch's,
    half-precision units), threads, versions, GPU."""
    f = cpu.features()
    info = {
        "cpu": f.name,
        "cpu_threads": torch.get_num_threads(),
        "maskops_isa": f.isa,
        "cpu_record": f.as_dict(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_bf16": cpu_bf16_units(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def cpu_summary() -> str:
    """One line for reports: the CPU, maskops' kernels, torch's, bfloat16, threads."""
    return f"{cpu.features().summary()}; {torch.get_num_threads()} threads"


def cpu_bf16_units() -> str:
    """What runs bfloat16 matrix products on this CPU (what oneDNN can dispatch to)."""
    f = cpu.features()
    if f.fast_bf16:
        return "AMX tiles" if f.amx else "AVX-512 BF16 dot products (no AMX)"
    why = f.missing_for(torch.bfloat16)
    return f"none ({why}): bfloat16 is slower than float32"
