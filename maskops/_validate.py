"""Argument checks shared by the public functions.

Every check runs before any kernel and raises a Python error that names the argument, what
was expected and what was given: TypeError for a wrong type or dtype, ValueError for a wrong
shape, size or value. The C++ kernels check again (TORCH_CHECK) for direct torch.ops callers.

torchvision.ops raises other classes for many of the same mistakes: RuntimeError from its C++
checks and from torch's operator schemas, AssertionError from ``torch._assert``, IndexError or
AttributeError from plain Python on a malformed argument, NotImplementedError from a torch
op without a kernel for the dtype. So that code written against torchvision (``except
RuntimeError:`` around an ``nms`` call, say) works unchanged, each maskops error is also an
instance of the class torchvision raises for that mistake: the classes below derive from both.
Every check takes the torchvision class as ``tv`` (``None``: torchvision accepts the input or
has no such argument); tests/test_torchvision_compat.py runs each mistake through both
libraries and checks the pairing.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- exception classes: a maskops TypeError / ValueError that is also torchvision's class ----


class TypeRuntimeError(TypeError, RuntimeError):
    """A wrong type where torchvision raises RuntimeError (an operator schema's type check)."""


class TypeNotImplementedError(TypeError, NotImplementedError):
    """An unsupported dtype. torchvision raises RuntimeError ("not implemented for 'Long'") or
    NotImplementedError (a torch op without a kernel for the dtype); this is both."""


class TypeAttributeError(TypeError, AttributeError):
    """Not a tensor (or a dict) where torchvision calls a tensor (dict) method on it."""


class TypeAttributeRuntimeError(TypeError, AttributeError, RuntimeError):
    """Not a tensor where torchvision 0.29 calls a tensor method on it and 0.26 hands it to an
    operator schema (RuntimeError)."""


class TypeAssertionError(TypeError, AssertionError):
    """A wrong type where torchvision checks with ``torch._assert``."""


class TypeIndexError(TypeError, IndexError):
    """A wrong type where torchvision indexes into it (e.g. a str output_size)."""


class ValueRuntimeError(ValueError, RuntimeError):
    """A wrong shape, size or device where torchvision's C++ checks (or torch) raise
    RuntimeError."""


class ValueNotImplementedError(ValueError, NotImplementedError):
    """A wrong device where torchvision (on the meta device) raises NotImplementedError and
    RuntimeError otherwise; this is both."""


class ValueAssertionError(ValueError, AssertionError):
    """A wrong shape or length where torchvision checks with ``torch._assert`` / ``assert``."""


class ValueIndexError(ValueError, IndexError):
    """A missing dimension or column that torchvision indexes into."""


class ValueAssertionIndexError(ValueError, AssertionError, IndexError):
    """Malformed RoI boxes: torchvision asserts on the number of columns and raises IndexError
    where a dimension is missing (and, in MultiScaleRoIAlign, where columns are missing)."""


class ValueIndexRuntimeError(ValueError, IndexError, RuntimeError):
    """A wrong shape that torchvision meets as IndexError or RuntimeError depending on the path
    (its input size, one feature level or several)."""


class ValueTypeError(ValueError, TypeError):
    """A wrong value where torchvision fails with TypeError (e.g. unpacking an int as a pair)."""


class ValueZeroDivisionError(ValueError, ZeroDivisionError):
    """An empty feature grid, whose stride torchvision computes by integer division by zero."""


_COMPAT = {
    (TypeError, RuntimeError): TypeRuntimeError,
    (TypeError, NotImplementedError): TypeNotImplementedError,
    (TypeError, AttributeError): TypeAttributeError,
    (TypeError, (AttributeError, RuntimeError)): TypeAttributeRuntimeError,
    (TypeError, AssertionError): TypeAssertionError,
    (TypeError, IndexError): TypeIndexError,
    (ValueError, RuntimeError): ValueRuntimeError,
    (ValueError, NotImplementedError): ValueNotImplementedError,
    (ValueError, AssertionError): ValueAssertionError,
    (ValueError, IndexError): ValueIndexError,
    (ValueError, (AssertionError, IndexError)): ValueAssertionIndexError,
    (ValueError, (IndexError, RuntimeError)): ValueIndexRuntimeError,
    (ValueError, TypeError): ValueTypeError,
    (ValueError, ZeroDivisionError): ValueZeroDivisionError,
}


def error(kind: type, message: str, tv=None) -> Exception:
    """A ``kind`` (TypeError or ValueError) error that is also an instance of ``tv``, the class
    (or tuple of classes) torchvision raises for the same mistake; plain ``kind`` for ``None``."""
    if tv is None or (isinstance(tv, type) and issubclass(kind, tv)):
        return kind(message)
    return _COMPAT[(kind, tv)](message)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def tensor(x, name: str, tv=AttributeError) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise error(TypeError, f"{name} must be a torch.Tensor, got {_describe(x)}", tv)
    return x


def floating(x, name: str, tensor_tv=AttributeError) -> torch.Tensor:
    tensor(x, name, tensor_tv)
    if x.dtype not in FLOAT_DTYPES:
        raise error(
            TypeError,
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}",
            NotImplementedError,
        )
    return x


def is_integer(x: torch.Tensor) -> bool:
    """An integer tensor (bool is not one)."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def real(x, name: str, tensor_tv=AttributeError) -> torch.Tensor:
    """A floating or integer tensor (boxes that torchvision's plain-torch box ops accept)."""
    tensor(x, name, tensor_tv)
    if x.dtype not in FLOAT_DTYPES and not is_integer(x):
        raise error(
            TypeError,
            f"{name} must have a floating or integer dtype, got {x.dtype}",
            NotImplementedError,
        )
    return x


def ndim(x: torch.Tensor, n: int, name: str, shape_hint: str, tv=RuntimeError) -> torch.Tensor:
    if x.dim() != n:
        raise error(
            ValueError,
            f"{name} must be a {n}-d tensor {shape_hint}, got shape {tuple(x.shape)}",
            tv,
        )
    return x


def same_device(
    x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, tv=RuntimeError
) -> None:
    if x.device != ref.device:
        raise error(
            ValueError,
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}",
            tv,
        )


def positive_int(v, name: str, tv=RuntimeError) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise error(TypeError, f"{name} must be an int, got {_describe(v)}", tv)
    if v <= 0:
        raise error(ValueError, f"{name} must be positive, got {v}", tv)
    return int(v)


def integer(v, name: str, tv=RuntimeError) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise error(TypeError, f"{name} must be an int, got {_describe(v)}", tv)
    return int(v)


def boolean(v, name: str, tv=RuntimeError) -> bool:
    if not isinstance(v, bool):
        raise error(TypeError, f"{name} must be a bool, got {_describe(v)}", tv)
    return v


# The largest sampling_ratio RoIAlign takes: the cap the kernels already put on the adaptive
# grid (roi_align.h, kMaxAdaptiveGrid). What a bin costs grows with it: the CPU kernel builds,
# per RoI and axis, a table of 2 * sampling_ratio taps per output row / column (an int64 index
# and a weight each, so 16 bytes * 2 * 1024 * 14 = 448 KiB for a 14x14 output at the cap; at
# 10**9 that is 2 * 10**9 taps per bin, the std::bad_alloc this check replaces), and the CUDA
# kernels take sampling_ratio**2 samples per output element and count them in an int32
# (which 1024**2 leaves far from overflow). A 1024 x 1024 grid per bin already samples any
# feature map far more densely than its cells; more samples cannot change the average.
MAX_SAMPLING_RATIO = 1024


def sampling_ratio(v, name: str = "sampling_ratio") -> int:
    """RoIAlign's samples per bin and axis: an int, at most MAX_SAMPLING_RATIO (<= 0: adaptive)."""
    v = integer(v, name)
    if v > MAX_SAMPLING_RATIO:
        raise ValueError(
            f"{name} must be at most {MAX_SAMPLING_RATIO} (sample points per bin "
            f"along each axis; <= 0 picks them per box), got {v}"
        )
    return v


def _tracing() -> bool:
    """Under torch.compile, Python floats may be traced as symbols (dynamic=True) whose values
    are unknown, so value checks of numbers are left to eager calls (types are still checked)."""
    return torch.compiler.is_compiling()


def positive_float(v, name: str, tv=RuntimeError) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise error(TypeError, f"{name} must be a number, got {_describe(v)}", tv)
    if _tracing():
        return v
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {v}")
    return v


def pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints, each positive (like torchvision's output_size).

    torchvision indexes a str or a 1-tuple past its end (IndexError); its kernels refuse a
    float (operator schema) or a negative size (RuntimeError); MultiScaleRoIAlign fails on a
    3-tuple with RuntimeError.
    """
    if isinstance(v, str):
        raise error(
            TypeError, f"{name} must be an int or a pair (height, width), got {v!r}", IndexError
        )
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise error(
                ValueError,
                f"{name} must be an int or a pair (height, width), got {v!r}",
                (IndexError, RuntimeError),
            )
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
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def boxes_to_rois(
    boxes, ref: torch.Tensor, name: str = "boxes", multiscale: bool = False
) -> torch.Tensor:
    """Validates boxes given as Tensor[K, 5] or a list of per-image Tensor[L, 4]; returns [K, 5].

    Box coordinates keep their floating dtype (the kernels read them in float32, or float64
    for float64 inputs), so float32 boxes with half-precision features lose no precision.

    ``multiscale``: for MultiScaleRoIAlign, whose torchvision counterpart takes only a list
    (TypeError for a tensor) and fails on boxes on another device with NotImplementedError
    (meta) or RuntimeError.
    """
    device_tv = NotImplementedError if multiscale else RuntimeError
    if isinstance(boxes, torch.Tensor):
        floating(boxes, name)
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise error(
                ValueError,
                f"{name} given as a tensor must have shape [K, 5] "
                f"(batch_index, x1, y1, x2, y2), got {tuple(boxes.shape)}",
                TypeError if multiscale else (AssertionError, IndexError),
            )
        same_device(boxes, ref, name, "input", device_tv)
        return boxes
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            floating(b, f"{name}[{i}]")
            if b.dim() != 2 or b.size(1) != 4:
                raise error(
                    ValueError,
                    f"{name}[{i}] must have shape [L, 4] (x1, y1, x2, y2), got {tuple(b.shape)}",
                    (AssertionError, IndexError),
                )
            same_device(b, ref, f"{name}[{i}]", "input", device_tv)
            parts.append(b)
        # Half-precision coordinates lose whole pixels past 1024: widen to float32.
        wide = [p.dtype == torch.float64 for p in parts] + [ref.dtype == torch.float64]
        dtype = torch.float64 if any(wide) else torch.float32
        if not parts:
            return ref.new_zeros((0, 5), dtype=dtype)
        return torch.cat(
            [
                torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], dim=1)
                for i, b in enumerate(parts)
            ],
            dim=0,
        )
    raise error(
        TypeError,
        f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {_describe(boxes)}",
        TypeError if multiscale else AssertionError,
    )


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
        raise ValueError(
            f"{name}[{k}, 0] (batch index) is {idx[k].item()}, expected an index "
            f"in [0, {batch_size}) for an input of batch size {batch_size}"
        )


def boxes_n4(
    x, name: str, tv=IndexError, integers: bool = False, tensor_tv=AttributeError
) -> torch.Tensor:
    """A Tensor[N, 4] of (x1, y1, x2, y2) boxes, floating (or, with ``integers``, integer).

    ``tv``: what torchvision raises for a wrong shape (IndexError where it indexes column 3,
    RuntimeError from its C++ checks)."""
    (real if integers else floating)(x, name, tensor_tv)
    if x.dim() != 2 or x.size(1) != 4:
        raise error(
            ValueError, f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(x.shape)}", tv
        )
    return x


def per_box(
    x,
    boxes: torch.Tensor,
    name: str,
    what: str,
    integer_ids: bool = False,
    tv=RuntimeError,
    tensor_tv=RuntimeError,
    device_tv=RuntimeError,
) -> torch.Tensor:
    """A Tensor[N] with one entry per box: floating scores, or integer class ids."""
    tensor(x, name, tensor_tv)
    if integer_ids:
        if not is_integer(x):
            raise TypeError(f"{name} must be an integer tensor of {what}, got {x.dtype}")
    elif x.dtype not in FLOAT_DTYPES:
        raise error(
            TypeError,
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}",
            NotImplementedError,
        )
    n = boxes.size(0)
    if x.dim() != 1 or x.size(0) != n:
        raise error(
            ValueError,
            f"{name} must have shape [{n}] ({what}, one per box), got {tuple(x.shape)}",
            tv,
        )
    same_device(x, boxes, name, "boxes", device_tv)
    return x


def number(v, name: str, tv=RuntimeError) -> float:
    """A real number (int or float, not bool), not NaN."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise error(TypeError, f"{name} must be a number, got {_describe(v)}", tv)
    if _tracing():
        return v
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN")
    return v


def optional_number(v, name: str):
    return None if v is None else number(v, name, tv=None)


def optional_non_negative_int(v, name: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {_describe(v)}")
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return int(v)


def non_negative_int(v, name: str) -> int:
    v = integer(v, name, tv=None)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return v


def non_negative_number(v, name: str, tv=RuntimeError) -> float:
    v = number(v, name, tv)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return v


def image_size(v, name: str) -> tuple[int, int]:
    """An image size (height, width): a pair of non-negative ints (a torch.Size works).

    torchvision unpacks it as a pair (TypeError for an int) and fails on a negative size with
    RuntimeError where it allocates an image of that size."""
    if not isinstance(v, (list, tuple, torch.Size)) or len(v) != 2:
        raise error(ValueError, f"{name} must be a pair (height, width), got {v!r}", TypeError)
    h, w = (
        integer(int(x) if isinstance(x, torch.Tensor) and x.dim() == 0 else x, f"{name}[{i}]")
        for i, x in enumerate(v)
    )
    if h < 0 or w < 0:
        raise error(ValueError, f"{name} must be non-negative, got {(h, w)}", RuntimeError)
    return h, w


def box_weights(v, name: str = "weights") -> tuple[float, float, float, float]:
    """Box-coder weights (wx, wy, ww, wh): 4 finite positive numbers (a sequence or a tensor)."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.numel() != 4:
            raise error(
                ValueError,
                f"{name} must hold 4 numbers (wx, wy, ww, wh), got {_describe(v)}",
                IndexError,
            )
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise error(
            ValueError, f"{name} must hold 4 numbers (wx, wy, ww, wh), got {v!r}", IndexError
        )
    return tuple(positive_float(x, f"{name}[{i}]") for i, x in enumerate(v))
