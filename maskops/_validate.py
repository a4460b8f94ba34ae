"""Argument checks shared by the public functions.

Every check runs before any kernel and raises a Python error that names the argument, what
was expected and what was given: TypeError for a wrong type or dtype, ValueError for a wrong
shape, size or value. The C++ kernels check again (TORCH_CHECK) for direct torch.ops callers.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    return x


def floating(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    return x


def ndim(x: torch.Tensor, n: int, name: str, shape_hint: str) -> torch.Tensor:
    if x.dim() != n:
        raise ValueError(f"{name} must be a {n}-d tensor {shape_hint}, got shape {tuple(x.shape)}")
    return x


def same_device(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), "
                         f"got {x.device}")


def positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(v)}")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return int(v)


def integer(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(v)}")
    return int(v)


def boolean(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(v)}")
    return v


def _tracing() -> bool:
    """Under torch.compile, Python floats may be traced as symbols (dynamic=True) whose values
    are unknown, so value checks of numbers are left to eager calls (types are still checked)."""
    return torch.compiler.is_compiling()


def positive_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(v)}")
    if _tracing():
        return v
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {v}")
    return v


def pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints, each positive (like torchvision's output_size)."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {v!r}")
        return positive_int(v[0], f"{name}[0]"), positive_int(v[1], f"{name}[1]")
    n = positive_int(v, name)
    return n, n


def is_traced(*tensors: torch.Tensor) -> bool:
    """True under torch.compile / export tracing, where tensor values cannot be read."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout an op's output takes from its input (mirrors csrc/common/checks.h)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def boxes_to_rois(boxes, ref: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """Validates boxes given as Tensor[K, 5] or a list of per-image Tensor[L, 4]; returns [K, 5].

    Box coordinates keep their floating dtype (the kernels read them in float32, or float64
    for float64 inputs), so float32 boxes with half-precision features lose no precision.
    """
    if isinstance(boxes, torch.Tensor):
        floating(boxes, name)
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(f"{name} given as a tensor must have shape [K, 5] "
                             f"(batch_index, x1, y1, x2, y2), got {tuple(boxes.shape)}")
        same_device(boxes, ref, name, "input")
        return boxes
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            floating(b, f"{name}[{i}]")
            if b.dim() != 2 or b.size(1) != 4:
                raise ValueError(f"{name}[{i}] must have shape [L, 4] (x1, y1, x2, y2), "
                                 f"got {tuple(b.shape)}")
            same_device(b, ref, f"{name}[{i}]", "input")
            parts.append(b)
        # Half-precision coordinates lose whole pixels past 1024: widen to float32.
        wide = [p.dtype == torch.float64 for p in parts] + [ref.dtype == torch.float64]
        dtype = torch.float64 if any(wide) else torch.float32
        if not parts:
            return ref.new_zeros((0, 5), dtype=dtype)
        return torch.cat([
            torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], dim=1)
            for i, b in enumerate(parts)
        ], dim=0)
    raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {_describe(boxes)}")


def batch_indices(rois: torch.Tensor, batch_size: int, name: str = "boxes") -> None:
    """Checks rois[:, 0] against the batch size where that costs no device sync (CPU tensors).

    On CUDA the kernels give RoIs with an out-of-range index zero output and zero gradient
    instead, so the call never waits for the GPU.
    """
    # is_traced first: under torch.export the number of boxes may be data-dependent, and
    # testing it for 0 would be a guard on it.
    if is_traced(rois) or rois.device.type != "cpu" or rois.numel() == 0:
        return
    idx = rois[:, 0]
    bad = ~((idx >= 0) & (idx < batch_size))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{k}, 0] (batch index) is {idx[k].item()}, expected an index "
                         f"in [0, {batch_size}) for an input of batch size {batch_size}")


def boxes_n4(x, name: str) -> torch.Tensor:
    """A floating Tensor[N, 4] of (x1, y1, x2, y2) boxes."""
    floating(x, name)
    if x.dim() != 2 or x.size(1) != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(x.shape)}")
    return x


def per_box(x, boxes: torch.Tensor, name: str, what: str, integer_ids: bool = False) -> torch.Tensor:
    """A Tensor[N] with one entry per box: floating scores, or integer class ids."""
    tensor(x, name)
    if integer_ids:
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor of {what}, got {x.dtype}")
    elif x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    n = boxes.size(0)
    if x.dim() != 1 or x.size(0) != n:
        raise ValueError(f"{name} must have shape [{n}] ({what}, one per box), "
                         f"got {tuple(x.shape)}")
    same_device(x, boxes, name, "boxes")
    return x


def number(v, name: str) -> float:
    """A real number (int or float, not bool), not NaN."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(v)}")
    if _tracing():
        return v
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN")
    return v


def optional_number(v, name: str):
    return None if v is None else number(v, name)


def optional_non_negative_int(v, name: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {_describe(v)}")
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return int(v)


def non_negative_int(v, name: str) -> int:
    v = integer(v, name)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return v


def non_negative_number(v, name: str) -> float:
    v = number(v, name)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return v


def image_size(v, name: str) -> tuple[int, int]:
    """An image size (height, width): a pair of non-negative ints (a torch.Size works)."""
    if not isinstance(v, (list, tuple, torch.Size)) or len(v) != 2:
        raise ValueError(f"{name} must be a pair (height, width), got {v!r}")
    h, w = (integer(int(x) if isinstance(x, torch.Tensor) and x.dim() == 0 else x, f"{name}[{i}]")
            for i, x in enumerate(v))
    if h < 0 or w < 0:
        raise ValueError(f"{name} must be non-negative, got {(h, w)}")
    return h, w


def box_weights(v, name: str = "weights") -> tuple[float, float, float, float]:
    """Box-coder weights (wx, wy, ww, wh): 4 finite positive numbers (a sequence or a tensor)."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.numel() != 4:
            raise ValueError(f"{name} must hold 4 numbers (wx, wy, ww, wh), got {_describe(v)}")
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise ValueError(f"{name} must hold 4 numbers (wx, wy, ww, wh), got {v!r}")
    return tuple(positive_float(x, f"{name}[{i}]") for i, x in enumerate(v))
