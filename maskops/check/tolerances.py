"""Tolerances: a few roundoffs of the arithmetic the kernels use, scaled by what was computed.

Kernels compute in float64 for float64 data and in float32 otherwise (half types are read in
float32 and rounded once at the end); see the package docstring.
"""

from __future__ import annotations

from typing import Optional

import torch

F64 = torch.float64
HALF_TYPES = (torch.float16, torch.bfloat16)


def roundoff(dtype: torch.dtype) -> float:
    """Roundoff of the arithmetic the kernels use for ``dtype``: float64 for float64 data,
    float32 for everything else (half types compute in float32)."""
    return torch.finfo(F64 if dtype == F64 else torch.float32).eps


def half_rounding(dtype: torch.dtype) -> float:
    """The one final rounding of a half-type result to its dtype (relative); 0 otherwise."""
    return torch.finfo(dtype).eps if dtype in HALF_TYPES else 0.0


def tolerance(dtype: torch.dtype, scale: float, k: float = 8.0, out_scale: Optional[float] = None):
    """``k`` roundoffs of the compute arithmetic at ``scale``, plus the final rounding of a
    half-type output of magnitude ``out_scale`` (default: ``scale``)."""
    out_scale = scale if out_scale is None else out_scale
    return k * roundoff(dtype) * scale + half_rounding(dtype) * out_scale


def amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0
