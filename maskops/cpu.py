"""What this CPU can do: the one place in maskops (and its model, tools and benchmarks) that
asks.

Three layers decide how fast (and whether) a CPU path runs, and each is asked here:

- **maskops' own kernels** are compiled for AVX-512, AVX2 and portable code; each call takes
  the variant of :func:`isa` (the CPU's widest, lowered by ``MASKOPS_CPU_ISA=avx2|default``
  at load or by :func:`use_isa`).
- **torch's ATen kernels** dispatch on torch's capability (``ATEN_CPU_CAPABILITY`` lowers it).
- **oneDNN** (convolutions, matmuls, the model's fused layers) computes bfloat16 / float16
  only on CPUs it supports natively (its own check); elsewhere its bfloat16 weight reorders
  raise. Whether half precision is also *faster* than float32 depends on dot-product units:
  AMX tiles or AVX-512 BF16. ``ONEDNN_MAX_CPU_ISA`` below AVX-512 takes those away.

Everything else calls :func:`features` (or the helpers below) and never reads cpuid or
``/proc/cpuinfo`` itself. :func:`pretend` is the test seam: inside it :func:`features`
reports what a test asks (e.g. no native bfloat16), so that each branch that depends on the
CPU runs on any host; emulated CPUs (``make test-cpu-kinds``) check the real answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import _C

ISAS = ("default", "avx2", "avx512")  # maskops' kernel variants, narrowest first
_ONEDNN_AVX512 = (
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
)


@dataclass(frozen=True)
class CpuFeatures:
    """One CPU's answers. ``isa``: the level maskops' kernels run now (``isa_supported`` the
    CPU's own); ``torch_capability``: ATen's (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``);
    ``native_bf16`` / ``native_fp16``: oneDNN computes that type on this CPU (the fused model
    path needs it); ``avx512_bf16``, ``amx``, ``amx_fp16``, ``avx512_vnni``: the dot-product units;
    ``onednn_max_isa``: oneDNN's cap from the environment, or None."""

    name: str
    isa: str
    isa_supported: str
    torch_capability: str
    native_bf16: bool
    native_fp16: bool
    avx512_bf16: bool
    amx: bool
    amx_fp16: bool
    avx512_vnni: bool
    onednn_max_isa: Optional[str]

    @property
    def fast_bf16(self) -> bool:
        """bfloat16 matrix products faster than float32: AMX tiles or AVX-512 BF16."""
        return self.native_bf16 and (self.amx or self.avx512_bf16)

    @property
    def fast_fp16(self) -> bool:
        """float16 matrix products faster than float32 (AMX-FP16 or AVX-512 FP16)."""
        return self.native_fp16 and self.amx_fp16

    def missing_for(self, dtype: torch.dtype) -> Optional[str]:
        """Why ``dtype`` (bfloat16 / float16) is slower than float32 on this CPU, or None."""
        if dtype == torch.bfloat16:
            if not self.native_bf16:
                return (
                    "no native bfloat16 (oneDNN needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
                    + self._capped()
                )
            if not self.fast_bf16:
                return "no bfloat16 dot-product units (AVX-512 BF16 or AMX)" + self._capped()
        elif dtype == torch.float16:
            if not self.native_fp16:
                return (
                    "no native float16 (oneDNN needs AVX-512 FP16, AMX-FP16 or "
                    "AVX-NE-CONVERT)" + self._capped()
                )
            if not self.fast_fp16:
                return "no float16 dot-product units (AMX-FP16)" + self._capped()
        return None

    def _capped(self) -> str:
        return f", ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}" if self.onednn_max_isa else ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fast_bf16"] = self.fast_bf16
        return d

    def summary(self) -> str:
        """One line for reports: the CPU, maskops' kernels, torch's, bfloat16."""
        capped = "" if self.isa == self.isa_supported else f" (capped from {self.isa_supported})"
        bf16 = (
            ("AMX" if self.amx else "AVX-512 BF16")
            if self.fast_bf16
            else ("native, no dot-product units" if self.native_bf16 else "not native")
        )
        return (
            f"{self.name}; maskops kernels: {self.isa}{capped}; torch: "
            f"{self.torch_capability}; bfloat16: {bf16}"
        )


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_says(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    return bool(fn()) if fn is not None else False


def _onednn_says(name: str) -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(getattr(mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _detected() -> CpuFeatures:
    # oneDNN's own bfloat16 check reads the CPU, not its ISA cap: below AVX-512 it would still
    # say yes and then run reference kernels (or fail), so a cap counts as "not native".
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or None
    onednn_full = cap is None or cap.upper() in _ONEDNN_AVX512
    return CpuFeatures(
        name=cpu_name(),
        isa=_C.cpu_isa(),
        isa_supported=_C.cpu_isa_supported(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=onednn_full and _onednn_says("_is_mkldnn_bf16_supported"),
        native_fp16=onednn_full and _onednn_says("_is_mkldnn_fp16_supported"),
        avx512_bf16=onednn_full and _torch_says("_is_avx512_bf16_supported"),
        amx=onednn_full and _torch_says("_is_amx_tile_supported"),
        amx_fp16=onednn_full and _torch_says("_is_amx_fp16_supported"),
        avx512_vnni=_torch_says("_is_vnni_supported"),
        onednn_max_isa=cap,
    )


_pretended: list = []  # stack of field overrides, innermost last


def features() -> CpuFeatures:
    """This CPU's answers (cached), with :func:`pretend`'s overrides and the kernels' current
    SIMD level."""
    f = dataclasses.replace(_detected(), isa=_C.cpu_isa())
    for changes in _pretended:
        f = dataclasses.replace(f, **changes)
    return f


@contextlib.contextmanager
def pretend(**changes) -> Iterator[CpuFeatures]:
    """Test seam: inside, :func:`features` reports ``changes`` (fields of
    :class:`CpuFeatures`, e.g. ``native_bf16=False``) and the once-only warnings are shown
    again. It changes what maskops decides, not what the CPU executes: for the kernels'
    SIMD level use :func:`use_isa`."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(CpuFeatures)}
    if unknown:
        raise TypeError(f"pretend(): no such CPU feature: {sorted(unknown)}")
    _pretended.append(changes)
    warned = set(_warned)
    _warned.clear()
    try:
        yield features()
    finally:
        _pretended.pop()
        _warned.clear()
        _warned.update(warned)


def isa() -> str:
    """The SIMD level maskops' CPU kernels dispatch to now: ``"avx512"``, ``"avx2"`` or
    ``"default"``."""
    return _C.cpu_isa()


@contextlib.contextmanager
def use_isa(level: str) -> Iterator[str]:
    """Runs maskops' CPU kernels at SIMD level ``level`` (at most the CPU's) inside the block;
    yields the level in force. Process-wide: not for use while other threads call ops."""
    if level not in ISAS:
        raise ValueError(f"level must be one of {ISAS}, got {level!r}")
    before = _C.cpu_isa()
    try:
        yield _C.set_cpu_isa(level)
    finally:
        _C.set_cpu_isa(before)


def _check_environment() -> None:
    cap = os.environ.get("MASKOPS_CPU_ISA")
    if cap is not None and cap not in ISAS:
        raise ValueError(f"MASKOPS_CPU_ISA must be one of {ISAS}, got {cap!r}")


_check_environment()


# ---- half precision: what to use, and a warning where it is slow ----

_HALF = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def inference_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The fastest dtype for the model's convolutions and matmuls on ``device``: on a CPU,
    bfloat16 where it is native and has dot-product units (AMX, AVX-512 BF16), else float32;
    on a GPU, bfloat16 where supported, else float16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and features().fast_bf16:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype, device: torch.device | str = "cpu") -> Optional[torch.dtype]:
    """``dtype`` as a torch dtype: ``"auto"`` -> :func:`inference_dtype`; ``"bf16"`` /
    ``"fp16"`` (and their long names) -> the type; ``None`` / ``"none"`` -> None."""
    if dtype is None or dtype == "none":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return inference_dtype(device)
    if isinstance(dtype, str) and dtype in _HALF:
        return _HALF[dtype]
    raise ValueError(f"dtype must be a torch dtype, 'auto', 'bf16', 'fp16' or None, got {dtype!r}")


_warned: set = set()


def warn_if_slow(
    dtype: Optional[torch.dtype], device: torch.device | str = "cpu", stacklevel: int = 2
) -> bool:
    """Warns (once per dtype and process) where half-precision ``dtype`` on the CPU is slower
    than float32, naming what the CPU lacks; returns whether it warned."""
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cpu":
        return False
    why = features().missing_for(dtype)
    if why is None or dtype in _warned:
        return False
    _warned.add(dtype)
    name = str(dtype).replace("torch.", "")
    warnings.warn(
        f"{name} on this CPU ({features().name}): {why}, so float32 is faster here",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    return True
