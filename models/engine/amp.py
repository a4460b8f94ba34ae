"""Half precision as the ``amp`` options ask for it: autocast for training and evaluation,
half weights or autocast for inference."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from maskops import cpu


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``--amp`` asks for on ``device`` (None: no autocast). ``auto``:
    bfloat16 where it is faster than float32 (:func:`maskops.cpu.inference_dtype`), else none.
    Warns once where the type asked for is slower than float32 on this CPU."""
    if amp not in ("none", "auto", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, auto, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU (use bf16 on the CPU)")
    dtype = cpu.resolve_dtype(amp, device)
    if dtype == torch.float32:
        return None
    cpu.warn_if_slow(dtype, device)
    return dtype


def half_dtype(amp: Optional[str], device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The half type an inference ``amp`` (None, ``auto``, ``bf16``, ``fp16``) asks for on
    ``device`` (None: float32)."""
    dtype = cpu.resolve_dtype(amp, device)
    return None if dtype == torch.float32 else dtype


def inference_autocast(amp: Optional[str], device: Union[str, torch.device], optimized: bool):
    """Autocast for inference with ``amp`` on a model run as built (an optimised model holds
    half weights already: no autocast)."""
    dtype = half_dtype(amp, device)
    if dtype is None or optimized:
        return contextlib.nullcontext()
    cpu.warn_if_slow(dtype, device)
    return torch.autocast(torch.device(device).type, dtype=dtype)
