"""Self-test of an installed maskops: ``python -m maskops.check`` (or ``maskops.check.run()``).

Runs every op on every device present (the CPU and each visible GPU) on fresh random inputs
of several shapes and dtypes and compares the results with

* a float64 reference written here in plain PyTorch, independently of the kernels (bilinear
  RoIAlign as interpolation matrices, greedy NMS, IoU, box coding, anchors, mask paste, RLE);
* the CPU kernel, for results computed on a GPU;
* torchvision, where it is installed;

and runs ``torch.autograd.gradcheck`` (float64) on every differentiable op and
``torch.library.opcheck`` on every op schema. It prints one row per (op, device, dtype,
check) and exits with 1 if anything failed, naming the failures in its last line (0: all
passed; 2: bad arguments).

Usage::

    python -m maskops.check                 # full check of the CPU and every visible GPU
    python -m maskops.check --quick         # a shorter run (seconds)
    python -m maskops.check --device cuda:1 # one device (cpu, cuda, cuda:N; comma-separated)
    python -m maskops.check --json out.json # also write the results as JSON (--json: stdout)
    python -m maskops.check --bench         # add a speed table against torchvision
    python -m maskops.check --ops nms,roi_align --seed 123   # a subset; reproduce inputs

Before any CUDA check the GPU's compute capability is held against the architectures the
extension was compiled for (``maskops.build_info()["cuda_arch_list"]``); a card the build
cannot run gets a message saying how to rebuild instead of a CUDA "no kernel image" error.

Tolerances. Kernels compute in float64 for float64 data and in float32 otherwise (half types
are read in float32 and rounded once at the end), so a result may differ from the float64
reference by a few units of that arithmetic's roundoff ``u`` (2**-23 or 2**-52), times the
size of what was computed, plus one rounding to the output dtype for half types. Each check
states its scale (e.g. RoIAlign: sample positions are computed to ``u * map size``, so the
bound is ``k * u * (1 + map size) * max|input|``). Discrete decisions (a box kept or
suppressed, a pixel above a threshold, a coordinate truncated to a pixel) cannot be held to
a tolerance: the inputs are drawn so that no decision sits within a margin of its threshold
(far wider than any roundoff), so every implementation must decide alike. None of this
depends on one CPU's rounding.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import maskops
from maskops import cpu

F64 = torch.float64
HALF_TYPES = (torch.float16, torch.bfloat16)


# ============================================================================ results

@dataclass
class Result:
    """One row of the report: an op checked one way on one device and dtype."""
    op: str
    device: str
    dtype: str
    check: str
    ok: bool
    max_error: Optional[float] = None  # at the worst element (largest error / tolerance)
    tolerance: Optional[float] = None  # the tolerance there; 0.0 means exact
    detail: str = ""                   # the worst case, or what failed
    cases: int = 0                     # comparisons made
    seconds: float = 0.0


@dataclass
class Report:
    ok: bool
    mode: str
    seed: int
    devices: List[str]
    build_info: dict
    location: str = ""  # the folder maskops was imported from
    results: List[Result] = field(default_factory=list)
    bench: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> List[Result]:
        return [r for r in self.results if not r.ok]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failures"] = [f"{r.op} {r.check} ({r.device}, {r.dtype})" for r in self.failures]
        d["cpu"] = cpu.features().as_dict()
        return d


class _Case:
    """Collects the comparisons of one report row; the row fails if any of them does."""

    def __init__(self, op: str, device: str, dtype: str, check: str):
        self.row = Result(op, device, dtype, check, ok=True)
        self._ratio = -1.0
        self._problems: List[str] = []

    def fail(self, message: str) -> None:
        self.row.ok = False
        self._problems.append(message)

    def note(self, message: str) -> None:
        if self.row.ok and not self.row.detail:
            self.row.detail = message

    def close(self, got: torch.Tensor, ref: torch.Tensor, tol, label: str = "",
              dtype: Optional[torch.dtype] = None) -> None:
        """``|got - ref| <= tol`` elementwise (tol: a number or a tensor broadcastable to ref).
        NaN must meet NaN."""
        self.row.cases += 1
        if not self._same_form(got, ref, label, dtype):
            return
        # on got's device: a GPU compares a large output faster than the host would
        g, r = got.detach().to(F64), ref.detach().to(device=got.device, dtype=F64)
        if r.numel() == 0:
            return
        t = torch.as_tensor(tol, dtype=F64).to(got.device).expand_as(r)
        diff = (g - r).abs()
        nan_g, nan_r = g.isnan(), r.isnan()
        diff = torch.where(nan_g & nan_r, 0.0, torch.where(nan_g | nan_r, math.inf, diff))
        ratio = torch.where(t > 0, diff / t.clamp_min(1e-300),
                            torch.where(diff > 0, math.inf, 0.0))
        i = int(ratio.flatten().argmax())
        worst, err, at = float(ratio.flatten()[i]), float(diff.flatten()[i]), float(t.flatten()[i])
        if worst > self._ratio:
            self._ratio, self.row.max_error, self.row.tolerance = worst, err, at
            self.row.detail = f"worst: {label}" if label else ""
        if not worst <= 1.0:
            where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), r.shape))
            self.fail(f"{label}: error {err:.3g} > tolerance {at:.3g} at {where} "
                      f"(got {float(g.flatten()[i]):.6g}, expected {float(r.flatten()[i]):.6g})")

    def equal(self, got: torch.Tensor, ref: torch.Tensor, label: str = "",
              dtype: Optional[torch.dtype] = None) -> None:
        """Exactly equal (indices, masks, values that involve no rounding)."""
        self.row.cases += 1
        if not self._same_form(got, ref, label, dtype):
            return
        g, r = got.detach().cpu(), ref.detach().cpu()
        if g.dtype != r.dtype:
            g, r = g.to(F64), r.to(F64)
        diff = g != r
        if g.is_floating_point():
            diff &= ~(g.isnan() & r.isnan())
        err = 0.0
        if bool(diff.any()):
            k = int(diff.sum())
            i = int(diff.flatten().nonzero()[0, 0])
            gi, ri = g.flatten()[i].item(), r.flatten()[i].item()
            self.fail(f"{label}: {k} of {r.numel()} elements differ, first at flat index {i} "
                      f"(got {gi}, expected {ri})")
            err = abs(float(gi) - float(ri)) if not isinstance(gi, bool) else 1.0
        if self.row.max_error is None or err > self.row.max_error:
            self.row.max_error = err
            if self.row.tolerance is None:
                self.row.tolerance = 0.0

    def guard(self, label: str, *others: "_Case"):
        """An error in the block fails this row (and ``others``), naming ``label``; the run
        goes on."""
        return _guard(label, self, *others)

    def _same_form(self, got, ref, label, dtype) -> bool:
        if not isinstance(got, torch.Tensor):
            self.fail(f"{label}: got {type(got).__name__}, expected a tensor")
            return False
        if tuple(got.shape) != tuple(ref.shape):
            self.fail(f"{label}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            return False
        if dtype is not None and got.dtype != dtype:
            self.fail(f"{label}: dtype {got.dtype}, expected {dtype}")
            return False
        return True

    def finish(self, seconds: float) -> Result:
        self.row.seconds = round(seconds, 3)
        if self._problems:
            more = f" (+{len(self._problems) - 2} more)" if len(self._problems) > 2 else ""
            self.row.detail = "; ".join(self._problems[:2]) + more
        return self.row


@contextlib.contextmanager
def _guard(label: str, *cases: _Case):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        for c in cases:
            c.row.cases += 1
            c.fail(f"{label}: {_first_line(e)}")


# ============================================================================ tolerances

def _u(dtype: torch.dtype) -> float:
    """Roundoff of the arithmetic the kernels use for ``dtype``: float64 for float64 data,
    float32 for everything else (half types compute in float32)."""
    return torch.finfo(F64 if dtype == F64 else torch.float32).eps


def _rounding(dtype: torch.dtype) -> float:
    """The one final rounding of a half-type result to its dtype (relative); 0 otherwise."""
    return torch.finfo(dtype).eps if dtype in HALF_TYPES else 0.0


def _tol(dtype: torch.dtype, scale: float, k: float = 8.0, out_scale: Optional[float] = None):
    """``k`` roundoffs of the compute arithmetic at ``scale``, plus the final rounding of a
    half-type output of magnitude ``out_scale`` (default: ``scale``)."""
    out_scale = scale if out_scale is None else out_scale
    return k * _u(dtype) * scale + _rounding(dtype) * out_scale


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# ============================================================================ GPU architecture

# TORCH_CUDA_ARCH_LIST's named architectures, as torch.utils.cpp_extension expands them.
_NAMED_ARCHES = {
    "kepler+tesla": "3.7", "kepler": "3.5+PTX", "maxwell+tegra": "5.3", "maxwell": "5.0;5.2+PTX",
    "pascal": "6.0;6.1+PTX", "volta+tegra": "7.2", "volta": "7.0+PTX", "turing": "7.5+PTX",
    "ampere+tegra": "8.7", "ampere": "8.0;8.6+PTX", "ada": "8.9+PTX", "hopper": "9.0+PTX",
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


def arch_mismatch_message(device: str, name: str, capability: Tuple[int, int],
                          arch_list: Optional[str]) -> str:
    cap = "%d.%d" % capability
    built = (f'TORCH_CUDA_ARCH_LIST="{arch_list}"' if arch_list
             else "the GPUs visible when it was built (the list was not recorded)")
    wider = f"{arch_list};{cap}" if arch_list else f"8.0;{cap}"
    return (f"{device} ({name}) has compute capability {cap} (sm_{capability[0]}{capability[1]}), "
            f"but this maskops build has CUDA kernels for {built}, which this card cannot run. "
            f"Rebuild maskops for it, from the maskops source folder: "
            f'TORCH_CUDA_ARCH_LIST="{cap}" pip install --no-build-isolation .  '
            f'(for several kinds of GPU list them all, e.g. TORCH_CUDA_ARCH_LIST="{wider}"; '
            f"unset, the build targets the GPUs it can see).")


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
        return (f"{device} is present but this maskops build has no CUDA kernels (it was built "
                "without the CUDA toolkit, or with MASKOPS_CPU_ONLY=1). Rebuild on a machine with "
                "nvcc: pip install --no-build-isolation .  (MASKOPS_FORCE_CUDA=1 makes a missing "
                "toolkit an error); or check the CPU only: --device cpu.")
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
            return f"a first maskops CUDA kernel failed on {device} ({name}): {_first_line(e)}"
    return None


# ============================================================================ references
# Plain float64 PyTorch, written from the ops' documented semantics (torchvision's), not from
# the kernels: e.g. RoIAlign as products of per-axis bilinear interpolation matrices.

def _axis_weights(start: float, length: float, pooled: int, grid: int, size: int) -> torch.Tensor:
    """RoIAlign along one axis: ``[pooled, size]`` weights that average the bilinear samples
    of each of ``pooled`` bins (``grid`` samples per bin, at the bin's sub-cell centres)."""
    bin_size = length / pooled
    p = torch.arange(pooled, dtype=F64)[:, None]
    i = torch.arange(grid, dtype=F64)[None, :]
    pos = (start + p * bin_size + (i + 0.5) * bin_size / grid).flatten()
    valid = ((pos >= -1.0) & (pos <= size)).to(F64)  # further out a sample reads 0
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    last = low >= size - 1  # at or past the last cell: read the last cell
    low = torch.where(last, float(size - 1), low)
    frac = torch.where(last, 0.0, pos - low)
    high = torch.where(last, low, low + 1)
    w = torch.zeros(pooled * grid, size, dtype=F64)
    rows = torch.arange(pooled * grid)
    w.index_put_((rows, low.long()), (1 - frac) * valid, accumulate=True)
    w.index_put_((rows, high.long()), frac * valid, accumulate=True)
    return w.view(pooled, grid, size).mean(1)


def _roi_geometry(box: Sequence[float], scale: float, ph: int, pw: int, sampling_ratio: int,
                  aligned: bool):
    """(y1, h, grid_h, x1, w, grid_w) of one RoI in feature-map cells."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
    w, h = x2 - x1, y2 - y1
    if not aligned:  # the original Mask R-CNN forces boxes to at least one cell
        w, h = max(w, 1.0), max(h, 1.0)
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
    return y1, h, gh, x1, w, gw


def _roi_weights(box, scale, ph, pw, height, width, sampling_ratio, aligned):
    y1, h, gh, x1, w, gw = _roi_geometry(box, scale, ph, pw, sampling_ratio, aligned)
    if gh <= 0 or gw <= 0 or height == 0 or width == 0:
        return None  # no samples: the output is 0
    return _axis_weights(y1, h, ph, gh, height), _axis_weights(x1, w, pw, gw, width)


def ref_roi_align(x: torch.Tensor, rois: torch.Tensor, ph: int, pw: int, scale: float,
                  sampling_ratio: int, aligned: bool, levels=None):
    """Float64 RoIAlign of ``x`` (one level, or a list of pyramid levels with ``levels[k]``
    the level of RoI k and ``scale`` a list). Returns (output, per-RoI weights)."""
    feats = [t.detach().to(F64) for t in (x if isinstance(x, (list, tuple)) else [x])]
    scales = scale if isinstance(scale, (list, tuple)) else [scale]
    rois = rois.detach().to(F64)
    k_total, channels = rois.shape[0], feats[0].shape[1]
    out = torch.zeros(k_total, channels, ph, pw, dtype=F64)
    weights = []
    for k in range(k_total):
        lvl = 0 if levels is None else levels[k]
        if lvl is None:
            weights.append(None)
            continue
        f = feats[lvl]
        wts = _roi_weights(rois[k, 1:].tolist(), scales[lvl], ph, pw, f.shape[2], f.shape[3],
                           sampling_ratio, aligned)
        weights.append(None if wts is None else (lvl, int(rois[k, 0]), *wts))
        if wts is not None:
            out[k] = torch.einsum("ph,chw,qw->cpq", wts[0], f[int(rois[k, 0])], wts[1])
    return out, weights


def ref_roi_align_backward(weights, grad: torch.Tensor, shapes) -> List[torch.Tensor]:
    """The input gradient of :func:`ref_roi_align` for output gradient ``grad``, per level."""
    grads = [torch.zeros(s, dtype=F64) for s in shapes]
    g = grad.detach().to(F64)
    for k, wts in enumerate(weights):
        if wts is not None:
            lvl, b, wy, wx = wts
            grads[lvl][b] += torch.einsum("ph,cpq,qw->chw", wy, g[k], wx)
    return grads


def ref_fpn_levels(rois: torch.Tensor, n_levels: int, k_min: int, canonical_scale: float,
                   canonical_level: float) -> List[Optional[int]]:
    """FPN level of each RoI (index into the levels; None: negative area, no level)."""
    out = []
    for x1, y1, x2, y2 in rois[:, 1:].to(F64).tolist():
        area = (x2 - x1) * (y2 - y1)
        if area < 0:
            out.append(None)
            continue
        v = canonical_level + math.log2(math.sqrt(area) / canonical_scale) + 1e-6 if area > 0 else -math.inf
        out.append(int(min(max(math.floor(v), k_min), k_min + n_levels - 1)) - k_min)
    return out


def ref_area(b: torch.Tensor) -> torch.Tensor:
    b = b.to(F64)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def ref_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU; 0 where the union is 0 (maskops' documented convention)."""
    a, b = a.to(F64), b.to(F64)
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    union = ref_area(a)[:, None] + ref_area(b)[None, :] - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 0.0)


def ref_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, classes=None) -> torch.Tensor:
    """Greedy NMS: by decreasing score (ties by index), keep a box unless a kept box of its
    class overlaps it with IoU > thr."""
    order = torch.sort(scores.to(F64), descending=True, stable=True).indices
    over = ref_iou(boxes, boxes) > thr
    if classes is not None:
        over &= classes[:, None] == classes[None, :]
    removed = [False] * boxes.shape[0]
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        for j in over[i].nonzero().flatten().tolist():
            removed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


def ref_anchors(feature_sizes, strides, sizes, ratios) -> torch.Tensor:
    """torchvision AnchorGenerator: per level, cell anchors round((-w, -h, w, h) / 2) (half to
    even; h = sqrt(r) s, w = s / sqrt(r), ratio-major) shifted to every cell, row by row."""
    out = []
    for (fh, fw), (sh, sw), s, r in zip(feature_sizes, strides, sizes, ratios):
        s, hr = torch.tensor(s, dtype=F64), torch.tensor(r, dtype=F64).sqrt()
        ws, hs = (s[None, :] / hr[:, None]).flatten(), (s[None, :] * hr[:, None]).flatten()
        cell = torch.round(torch.stack([-ws, -hs, ws, hs], 1) / 2)
        yy, xx = torch.meshgrid(torch.arange(fh, dtype=F64) * sh, torch.arange(fw, dtype=F64) * sw,
                                indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 4)
        out.append((shifts[:, None, :] + cell[None]).reshape(-1, 4))
    return torch.cat(out)


def ref_decode(codes: torch.Tensor, boxes: torch.Tensor, weights, clamp: float) -> torch.Tensor:
    c = codes.to(F64).reshape(codes.shape[0], -1, 4)
    b = boxes.to(F64)[:, None, :]
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    cx, cy = b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h
    wx, wy, ww, wh = weights
    pcx, pcy = c[..., 0] / wx * w + cx, c[..., 1] / wy * h + cy
    pw = torch.exp((c[..., 2] / ww).clamp(max=clamp)) * w
    ph = torch.exp((c[..., 3] / wh).clamp(max=clamp)) * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)


def ref_encode(gt: torch.Tensor, proposals: torch.Tensor, weights) -> torch.Tensor:
    g, p = gt.to(F64), proposals.to(F64)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    wx, wy, ww, wh = weights
    return torch.stack([wx * ((g[:, 0] + 0.5 * gw) - (p[:, 0] + 0.5 * pw)) / pw,
                        wy * ((g[:, 1] + 0.5 * gh) - (p[:, 1] + 0.5 * ph)) / ph,
                        ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)


def ref_clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b = boxes.to(F64)
    bound = torch.tensor([width, height, width, height], dtype=F64)
    return torch.minimum(b.clamp(min=0), bound)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Bilinear resize ``n_in -> n_out`` with align_corners=False, as a ``[n_out, n_in]`` matrix."""
    src = ((torch.arange(n_out, dtype=F64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=n_in - 1)
    frac = src - i0
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=F64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0.long()), 1 - frac, accumulate=True)
    m.index_put_((rows, i1.long()), frac, accumulate=True)
    return m


def _expanded_boxes(boxes: torch.Tensor, m: int, padding: int) -> torch.Tensor:
    """Boxes grown by (M + 2 padding) / M about their centre (before truncation to pixels)."""
    b = boxes.to(F64)
    s = (m + 2 * padding) / m
    wh, hh = (b[:, 2] - b[:, 0]) * 0.5 * s, (b[:, 3] - b[:, 1]) * 0.5 * s
    cx, cy = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
    return torch.stack([cx - wh, cy - hh, cx + wh, cy + hh], 1)


def ref_paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
              padding: int) -> torch.Tensor:
    """torchvision's paste_masks_in_image in float64, every channel: pad each mask, grow its
    box to match, truncate the box to whole pixels, resize bilinearly onto it, clip."""
    n, c, m, _ = masks.shape
    padded = F.pad(masks.to(F64), (padding,) * 4)
    mp = m + 2 * padding
    ext = _expanded_boxes(boxes, m, padding).trunc().long().tolist()
    out = torch.zeros(n, c, height, width, dtype=F64)
    for i, (x0, y0, x1, y1) in enumerate(ext):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = torch.einsum("hi,cij,wj->chw", _resize_matrix(mp, h), padded[i], _resize_matrix(mp, w))
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if xb > xa and yb > ya:
            out[i, :, ya:yb, xa:xb] = resized[:, ya - y0:yb - y0, xa - x0:xb - x0]
    return out


def ref_rle(mask: torch.Tensor) -> bytes:
    """COCO compressed RLE of one [H, W] mask: run lengths of the column-major pixels
    starting with a 0-run, each (after the first three, minus the run two before) written as
    6-bit groups (5 data bits + a continuation bit) offset to ASCII 48."""
    flat = (mask != 0).t().flatten().to(torch.int8)
    if flat.numel() == 0:
        return b""
    edges = (flat[1:] != flat[:-1]).nonzero().flatten() + 1
    bounds = [0] + edges.tolist() + [flat.numel()]
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if flat[0] == 1:
        counts = [0] + counts
    out = bytearray()
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append((c | 0x20 if more else c) + 48)
    return bytes(out)


# ============================================================================ inputs

def _rand(gen, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=F64)


def _boxes(gen, n: int, size: float = 256.0, min_side: float = 4.0, max_side: float = 96.0):
    """Float64 [n, 4] boxes with sides in [min_side, max_side], corners in the image."""
    xy = _rand(gen, n, 2) * (size - min_side)
    wh = min_side + _rand(gen, n, 2) * (max_side - min_side)
    return torch.cat([xy, xy + wh], 1)


def _redraw(make, bad, tries: int = 100):
    """Draws with ``make(n)`` until no row is ``bad`` (a decision too close to call)."""
    x = make(None)
    for _ in range(tries):
        b = bad(x)
        if not bool(b.any()):
            return x
        x[b] = make(int(b.sum()))
    raise RuntimeError("could not draw inputs away from decision boundaries")


def _near_int(v: torch.Tensor, margin: float) -> torch.Tensor:
    return (v - v.round()).abs() < margin


def _rois(gen, k, batch, image_hw, scale, ph, pw, map_hw, sampling_ratio, aligned, dtype,
          levels=None):
    """RoIs [k, 5] (a third partly off the image), redrawn until no sample point sits near
    the edge of the readable range (-1 or the map size), no adaptive grid size near a
    whole number and, with ``levels`` = (n, k_min, canonical scale, canonical level), no
    box near an FPN level boundary."""
    ih, iw = image_hw
    rdtype = dtype if dtype in (torch.float32, F64) else torch.float32  # half features: float32 boxes

    def make(n):
        n = k if n is None else n
        xy = _rand(gen, n, 2) * torch.tensor([iw * 1.2, ih * 1.2], dtype=F64) - torch.tensor([iw * 0.1, ih * 0.1], dtype=F64)
        wh = 0.5 + _rand(gen, n, 2) * torch.tensor([iw * 0.6, ih * 0.6], dtype=F64)
        b = torch.randint(0, batch, (n, 1), generator=gen).to(F64)
        return torch.cat([b, xy, xy + wh], 1).to(rdtype).to(F64)

    def bad(r):
        out = torch.zeros(r.shape[0], dtype=torch.bool)
        for j, box in enumerate(r[:, 1:].tolist()):
            if levels is not None:
                n_lv, k_min, cs, cl = levels
                area = (box[2] - box[0]) * (box[3] - box[1])
                v = cl + math.log2(math.sqrt(area) / cs) + 1e-6
                lvl = min(max(math.floor(v), k_min), k_min + n_lv - 1) - k_min
                s, (mh, mw) = scale[lvl], map_hw[lvl]
                out[j] = abs(v - round(v)) < 1e-3
            else:
                s, (mh, mw) = scale, map_hw
            y1, h, gh, x1, w, gw = _roi_geometry(box, s, ph, pw, sampling_ratio, aligned)
            if sampling_ratio <= 0:
                out[j] |= bool(_near_int(torch.tensor([h / ph, w / pw]), 1e-4).any())
            for start, length, pooled, grid, limit in ((y1, h, ph, gh, mh), (x1, w, pw, gw, mw)):
                if grid <= 0:
                    continue
                p = torch.arange(pooled, dtype=F64)[:, None]
                i = torch.arange(grid, dtype=F64)[None, :]
                pos = start + p * (length / pooled) + (i + 0.5) * (length / pooled) / grid
                m = 1e-4 * (1 + pos.abs())
                out[j] |= bool((((pos + 1).abs() < m) | ((pos - limit).abs() < m)).any())
        return out

    return _redraw(make, bad).to(rdtype)


def _without_close_calls(boxes: torch.Tensor, thresholds: Sequence[float], margin: float = 1e-4,
                         chunk: int = 512) -> torch.Tensor:
    """A mask of boxes to keep so that no two kept ones have an IoU within ``margin`` of a
    threshold (the later box of each such pair goes). Computed in row chunks, on the boxes'
    device."""
    n = boxes.shape[0]
    drop = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    b = boxes.to(F64)
    for start in range(0, n, chunk):
        iou = ref_iou(b[start:start + chunk], b)
        close = torch.zeros_like(iou, dtype=torch.bool)
        for t in thresholds:
            close |= (iou - t).abs() < margin
        rows = torch.arange(start, start + iou.shape[0], device=boxes.device)[:, None]
        close &= torch.arange(n, device=boxes.device)[None, :] > rows
        drop |= close.any(0)
    return ~drop


# ============================================================================ the checks

@contextlib.contextmanager
def _deterministic(on: bool):
    """torch.use_deterministic_algorithms(on) for the block: maskops' CUDA RoIAlign backward
    then uses its gather algorithm instead of atomics. (warn_only: other ops merely warn.)"""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(on, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


class _Checker:
    """The checks of one device. Each ``check_<group>`` method adds report rows."""

    def __init__(self, device: torch.device, full: bool, gen: torch.Generator,
                 emit: Callable[[Result], None]):
        self.device, self.full, self.gen, self.emit = device, full, gen, emit
        self.dev = str(device)
        self.cuda = device.type == "cuda"
        self.results: List[Result] = []
        try:
            import torchvision  # noqa: F401  (optional: parity rows when installed)
            self.tv = torchvision
        except Exception:  # noqa: BLE001 - a broken torchvision is as good as none here
            self.tv = None

    # ---- plumbing

    @contextlib.contextmanager
    def rows(self, *specs):
        """Report rows (op, dtype, check) filled in by the block; yields one _Case per spec
        (the case itself for one spec). An error escaping the block fails all of them; wrap
        independent steps in ``case.guard(label)`` so that an error fails only that row."""
        cases = [_Case(op, self.dev, _dname(dtype), check) for op, dtype, check in specs]
        t0 = time.perf_counter()
        try:
            yield cases[0] if len(cases) == 1 else cases
        except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
            for c in cases:
                c.fail(_first_line(e))
        if self.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        seconds = (time.perf_counter() - t0) / len(cases)
        for c in cases:
            row = c.finish(seconds)
            self.results.append(row)
            self.emit(row)

    def case(self, op: str, dtype, check: str):
        return self.rows((op, dtype, check))

    def leaf(self, x: torch.Tensor, device=None) -> torch.Tensor:
        """A copy of ``x`` on the device that requires grad (``x`` itself is left alone)."""
        return x.detach().to(self.device if device is None else device).clone().requires_grad_()

    def on(self, x, device=None):
        device = self.device if device is None else device
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(self.on(v, device) for v in x)
        return x

    def dtypes(self, half: bool = True) -> List[torch.dtype]:
        out = [torch.float32, F64]
        if half and self.full:
            out += [torch.float16, torch.bfloat16]
        elif half and self.cuda:
            out += [torch.float16]
        return out

    # ---- RoIAlign

    def _grad(self, fn, inputs, grad, deterministic=False):
        """fn's output and the gradient of ``(output * grad).sum()`` for each input."""
        with _deterministic(True) if deterministic else contextlib.nullcontext():
            out = fn(*inputs)
            return out, torch.autograd.grad(out, inputs, grad)

    def check_roi_align(self):
        cases = [((2, 8, 20, 24), (7, 7), 1 / 4, 2, True),  # (N, C, H, W), out, scale, sr, aligned
                 ((1, 3, 9, 13), (3, 5), 1.0, -1, False)]
        if self.full:
            cases += [((2, 16, 33, 41), (14, 14), 1 / 8, 0, True),
                      ((3, 5, 16, 16), (2, 9), 1 / 16, 1, False),
                      ((1, 40, 13, 50), (7, 7), 1 / 16, 3, True),
                      ((2, 32, 50, 50), (7, 7), 1 / 16, 2, True)]
        layouts = ["nchw", "channels_last"] if self.full else ["nchw"]
        for dtype in self.dtypes():
            done = []
            with self.rows(("roi_align", dtype, "forward vs float64 ref"),
                           ("roi_align", dtype, "backward vs float64 ref"),
                           ("roi_align", dtype, "backward deterministic: ref, repeat")) as (fwd, bwd, det):
                for shape, (ph, pw), scale, sr, aligned in cases:
                    n, c, h, w = shape
                    x = torch.randn(*shape, generator=self.gen, dtype=F64).to(dtype)
                    rois = _rois(self.gen, 13 if self.full else 9, n, (h / scale, w / scale), scale,
                                 ph, pw, (h, w), sr, aligned, dtype)
                    ref, weights = ref_roi_align(x, rois, ph, pw, scale, sr, aligned)
                    g = torch.randn(ref.shape, generator=self.gen, dtype=F64).to(dtype)
                    ref_g = ref_roi_align_backward(weights, g, [shape])[0]
                    ref_ga = ref_roi_align_backward(weights, g.abs(), [shape])[0]  # sum of |terms|
                    # Sample positions carry roundoff u * (map size); outputs are averages of x
                    # and gradients sums of grad terms, so scale by those magnitudes.
                    t_f = _tol(dtype, (1 + max(h, w)) * _amax(x.to(F64)), 8, _amax(ref))
                    t_b = _tol(dtype, (1 + max(h, w)) * _amax(ref_ga), 16, _amax(ref_g))
                    label = f"{tuple(shape)}->{ph}x{pw} scale {scale:g} sr {sr} aligned {aligned}"
                    args = (rois, (ph, pw), scale, sr, aligned)
                    pool = self._pool(maskops.roi_align, args)
                    for layout in layouts:
                        xi = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
                        lab = f"{label} {layout}"
                        with fwd.guard(lab, bwd):
                            out, (gi,) = self._grad(pool, [self.leaf(xi)], self.on(g))
                            fwd.close(out, ref, t_f, lab, dtype=dtype)
                            if layout == "channels_last" and not out.is_contiguous(memory_format=torch.channels_last):
                                fwd.fail(f"{lab}: the output is not channels_last")
                            bwd.close(gi, ref_g, t_b, lab, dtype=dtype)
                            if not self.cuda:  # the CPU backward is deterministic in every mode
                                bwd.equal(self._grad(pool, [self.leaf(xi)], g)[1][0], gi, f"{lab}: 2nd run")
                        with det.guard(lab):
                            g1 = self._grad(pool, [self.leaf(xi)], self.on(g), deterministic=True)[1][0]
                            g2 = self._grad(pool, [self.leaf(xi)], self.on(g), deterministic=True)[1][0]
                            det.close(g1, ref_g, t_b, lab, dtype=dtype)
                            det.equal(g2, g1, f"{lab}: 2nd run")
                    done.append((args, x, g, t_f, t_b, label))
            if self.cuda:
                with self.case("roi_align", dtype, "forward+backward vs CPU kernel") as cmp:
                    for args, x, g, t_f, t_b, label in done:
                        with cmp.guard(label):
                            pool = self._pool(maskops.roi_align, args)
                            out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g))
                            out_c, (gi_c,) = self._grad(pool, [self.leaf(x, "cpu")], g)
                            cmp.close(out, out_c, 2 * t_f, label, dtype=dtype)
                            cmp.close(gi, gi_c, 2 * t_b, label, dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("roi_align", dtype, "forward+backward vs torchvision") as cmp:
                    for args, x, g, t_f, t_b, label in done:
                        with cmp.guard(label):
                            pool = self._pool(maskops.roi_align, args)
                            tv_pool = self._pool(self.tv.ops.roi_align, args)
                            out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g))
                            out_t, (gi_t,) = self._grad(tv_pool, [self.leaf(x)], self.on(g))
                            cmp.close(out, out_t, 2 * t_f, label, dtype=dtype)
                            cmp.close(gi, gi_t, 2 * t_b, label, dtype=dtype)
        if self.cuda and self.full:
            self._large_roi_align()
        x = torch.randn(2, 2, 5, 6, generator=self.gen, dtype=F64)
        rois = _rois(self.gen, 3, 2, (10, 12), 0.5, 2, 3, (5, 6), 2, True, F64)
        self._gradcheck("roi_align", lambda t, r: maskops.roi_align(t, r, (2, 3), 0.5, 2, True),
                        [x, rois], grad_args=(0,))

    def _large_roi_align(self):
        """Mask R-CNN sizes (many thread blocks) on the GPU against the CPU kernel."""
        shape, k, scale = (2, 256, 50, 50), 1000, 1 / 16
        for dtype in (torch.float32, torch.float16):
            with self.case("roi_align", dtype, f"{k} RoIs x {shape[1]} ch vs CPU kernel") as c:
                x = torch.randn(*shape, generator=self.gen).to(dtype)
                rois = _rois(self.gen, k, 2, (800, 800), scale, 7, 7, (50, 50), 2, True, dtype)
                g = torch.randn(k, shape[1], 7, 7, generator=self.gen).to(dtype)
                pool = lambda t: maskops.roi_align(t, rois.to(t.device), 7, scale, 2, True)
                out_c, (gi_c,) = self._grad(pool, [self.leaf(x, "cpu")], g)
                (g_abs,) = self._grad(pool, [self.leaf(x.float(), "cpu")], g.float().abs())[1]
                t_f = _tol(dtype, 51 * _amax(x.float()), 8, _amax(out_c.float()))
                t_b = _tol(dtype, 51 * _amax(g_abs), 16, _amax(gi_c.float()))
                for det in (False, True):
                    lab = "deterministic" if det else "atomic"
                    with c.guard(lab):
                        out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g), deterministic=det)
                        c.close(out, out_c, t_f, f"forward ({lab})", dtype=dtype)
                        c.close(gi, gi_c, t_b, f"backward ({lab})", dtype=dtype)

    @staticmethod
    def _pool(fn, args):
        """``fn(features, rois, *rest)`` with ``args = (rois, *rest)``, the RoIs moved to the
        features' device."""
        rois, *rest = args
        return lambda t: fn(t, rois.to(t.device), *rest)

    def _gradcheck(self, op, fn, inputs, grad_args):
        """torch.autograd.gradcheck in float64 on small inputs; on CUDA also with the
        deterministic backward (whose repeated runs must agree bit for bit)."""
        for det in ([False, True] if self.cuda else [False]):
            with self.case(op, F64, "gradcheck" + (" deterministic" if det else "")) as c:
                args = [self.leaf(t) if i in grad_args else self.on(t) for i, t in enumerate(inputs)]
                # CUDA atomics may add in another order on each run: allow float64 roundoff
                nondet = 1e-12 if self.cuda and not det else 0.0
                with _deterministic(det) if self.cuda else contextlib.nullcontext():
                    torch.autograd.gradcheck(fn, args, nondet_tol=nondet, raise_exception=True)
                c.row.cases += 1

    # ---- multi-level RoIAlign

    def check_multiscale_roi_align(self):
        ih = iw = 256
        n, ch, k_min, n_lv = 2, 4, 2, 4
        scales = [2.0 ** -(k_min + i) for i in range(n_lv)]
        configs = [(64.0, 4.0, 2, False), (64.0, 4.0, -1, True)]  # canonical scale, level, sr, aligned
        if self.full:
            configs += [(224.0, 4.0, 0, True), (32.0, 3.0, 3, False)]
        for dtype in self.dtypes():
            done = []
            with self.rows(("multiscale_roi_align", dtype, "forward vs float64 ref"),
                           ("multiscale_roi_align", dtype, "backward vs float64 ref"),
                           ("multiscale_roi_align", dtype, "backward deterministic: ref, repeat")) as (fwd, bwd, det):
                for cs, cl, sr, aligned in configs:
                    feats = [torch.randn(n, ch, int(ih * s), int(iw * s), generator=self.gen,
                                         dtype=F64).to(dtype) for s in scales]
                    maps = [tuple(f.shape[2:]) for f in feats]
                    rois = _rois(self.gen, 24 if self.full else 16, n, (ih, iw), scales, 3, 3, maps,
                                 sr, aligned, dtype, levels=(n_lv, k_min, cs, cl))
                    if self.full:  # an inverted box: negative area, no level, zeros
                        rois[0, 1:] = torch.tensor([30.0, 20.0, 10.0, 60.0], dtype=rois.dtype)
                    levels = ref_fpn_levels(rois, n_lv, k_min, cs, cl)
                    ref, weights = ref_roi_align(feats, rois, 3, 3, scales, sr, aligned, levels)
                    g = torch.randn(ref.shape, generator=self.gen, dtype=F64).to(dtype)
                    shapes = [f.shape for f in feats]
                    ref_g = ref_roi_align_backward(weights, g, shapes)
                    ref_ga = ref_roi_align_backward(weights, g.abs(), shapes)
                    big = max(max(m) for m in maps)
                    t_f = _tol(dtype, (1 + big) * max(_amax(f.to(F64)) for f in feats), 8, _amax(ref))
                    t_b = [_tol(dtype, (1 + big) * _amax(a), 16, _amax(r)) for a, r in zip(ref_ga, ref_g)]
                    label = f"canonical {cs:g}/{cl:g} sr {sr} aligned {aligned}"
                    pool = lambda *fs, r=rois, q=sr, a=aligned, cs=cs, cl=cl: \
                        maskops.multiscale_roi_align(list(fs), r.to(fs[0].device), 3, scales, q, cs, cl, a)
                    with fwd.guard(label, bwd):
                        out, grads = self._grad(pool, [self.leaf(f) for f in feats], self.on(g))
                        fwd.close(out, ref, t_f, label, dtype=dtype)
                        for lv, (gi, rg, t) in enumerate(zip(grads, ref_g, t_b)):
                            bwd.close(gi, rg, t, f"{label} level {lv}", dtype=dtype)
                    with det.guard(label):
                        d1 = self._grad(pool, [self.leaf(f) for f in feats], self.on(g), deterministic=True)[1]
                        d2 = self._grad(pool, [self.leaf(f) for f in feats], self.on(g), deterministic=True)[1]
                        for lv, (a1, a2, rg, t) in enumerate(zip(d1, d2, ref_g, t_b)):
                            det.close(a1, rg, t, f"{label} level {lv}", dtype=dtype)
                            det.equal(a2, a1, f"{label} level {lv}: 2nd run")
                    done.append((pool, feats, rois, g, t_f, t_b, label, (cs, cl, sr, aligned)))
            if self.cuda:
                with self.case("multiscale_roi_align", dtype, "forward+backward vs CPU kernel") as cmp:
                    for pool, feats, rois, g, t_f, t_b, label, _ in done:
                        with cmp.guard(label):
                            out, grads = self._grad(pool, [self.leaf(f) for f in feats], self.on(g))
                            out_c, grads_c = self._grad(pool, [self.leaf(f, "cpu") for f in feats], g)
                            cmp.close(out, out_c, 2 * t_f, label, dtype=dtype)
                            for a1, a2, t in zip(grads, grads_c, t_b):
                                cmp.close(a1, a2, 2 * t, label, dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("multiscale_roi_align", dtype, "forward vs torchvision") as cmp:
                    for pool, feats, rois, g, t_f, t_b, label, (cs, cl, sr, aligned) in done:
                        if aligned:
                            continue  # torchvision's module pools with aligned=False only
                        with cmp.guard(label):
                            names = [f"p{i}" for i in range(n_lv)]
                            tv_pool = self.tv.ops.MultiScaleRoIAlign(names, 3, sr, canonical_scale=cs,
                                                                     canonical_level=cl)
                            # torchvision has no level for a negative area: leave those out
                            r = rois[ref_area(rois[:, 1:]) >= 0]
                            per_image = [self.on(r[r[:, 0] == b][:, 1:]) for b in range(n)]
                            r = torch.cat([r[r[:, 0] == b] for b in range(n)])
                            got = tv_pool(dict(zip(names, self.on(feats))), per_image, [(ih, iw)] * n)
                            ours = maskops.multiscale_roi_align(self.on(feats), self.on(r), 3, scales, sr, cs, cl, aligned)
                            cmp.close(ours, got, 2 * t_f, label, dtype=dtype)
        f0 = torch.randn(1, 2, 8, 8, generator=self.gen, dtype=F64)
        f1 = torch.randn(1, 2, 4, 4, generator=self.gen, dtype=F64)
        # with canonical scale 32 the first and last box read level 0, the second level 1
        rois = torch.tensor([[0, 1.0, 2.0, 9.0, 13.0], [0, 3.0, 1.0, 30.0, 28.0], [0, 0.5, 0.5, 20.0, 6.0]], dtype=F64)
        self._gradcheck("multiscale_roi_align",
                        lambda a, b, r: maskops.multiscale_roi_align([a, b], r, 2, [0.25, 0.125], 2, 32, 4, True),
                        [f0, f1, rois], grad_args=(0, 1))

    # ---- NMS

    def check_nms(self):
        sizes = [300, 2000] if self.full else [300]
        thresholds = [0.5, 0.3, 0.7] if self.full else [0.5]
        for dtype in self.dtypes():
            done = []
            with self.rows(("nms", dtype, "vs greedy float64 ref"),
                           ("batched_nms", dtype, "vs greedy float64 ref")) as (c_nms, c_bat):
                for n in sizes:
                    # the same density of boxes whatever n is
                    boxes = _boxes(self.gen, n, 256.0 * math.sqrt(n / 300)).to(dtype)
                    boxes = boxes[_without_close_calls(boxes, thresholds, 1e-3)]
                    n = boxes.shape[0]
                    scores = torch.rand(n, generator=self.gen)
                    if self.full and dtype == torch.float16:
                        scores = scores.half()  # many equal scores: ties go by index
                    classes = torch.randint(0, 7, (n,), generator=self.gen)
                    b, s, k = self.on(boxes), self.on(scores), self.on(classes)
                    for thr in thresholds:
                        label = f"{n} boxes iou>{thr}"
                        ref = ref_nms(boxes, scores, thr)
                        ref_b = ref_nms(boxes, scores, thr, classes)
                        got = got_b = None
                        with c_nms.guard(label):
                            got = maskops.nms(b, s, thr)
                            c_nms.equal(got, ref, label, dtype=torch.int64)
                        with c_bat.guard(label):
                            got_b = maskops.batched_nms(b, s, k, thr)
                            c_bat.equal(got_b, ref_b, label, dtype=torch.int64)
                        done.append((boxes, scores, classes, thr, label, got, got_b))
                        if self.full:  # score_threshold and max_output
                            st, mo = 0.3, max(1, len(ref) // 2)
                            lab = f"{label} score>{st} max {mo}"
                            with c_nms.guard(lab):
                                got2 = maskops.nms(b, s, thr, score_threshold=st, max_output=mo)
                                c_nms.equal(got2, ref[scores[ref].to(F64) > st][:mo], lab, dtype=torch.int64)
                            with c_bat.guard(lab):
                                got2 = maskops.batched_nms(b, s, k, thr, score_threshold=st, max_output=mo)
                                c_bat.equal(got2, ref_b[scores[ref_b].to(F64) > st][:mo], lab, dtype=torch.int64)
            if self.cuda:
                with self.case("nms", dtype, "nms+batched_nms vs CPU kernel") as cmp:
                    for boxes, scores, classes, thr, label, got, got_b in done:
                        with cmp.guard(label):
                            cmp.equal(got, maskops.nms(boxes, scores, thr), label)
                            cmp.equal(got_b, maskops.batched_nms(boxes, scores, classes, thr), label)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("nms", dtype, "nms+batched_nms vs torchvision") as cmp:
                    for boxes, scores, classes, thr, label, got, got_b in done:
                        with cmp.guard(label):
                            b, s, k = self.on(boxes), self.on(scores.to(dtype)), self.on(classes)
                            cmp.equal(got, self.tv.ops.nms(b, s, thr), label)
                            tv_b = self.tv.ops.batched_nms(b, s, k, thr)
                            if n > 1000:  # torchvision merges classes with an unstable sort there
                                got_b, tv_b = got_b.sort().values, tv_b.sort().values
                            cmp.equal(got_b, tv_b, label)
        if self.cuda and self.full:
            self._large_nms()

    def _large_nms(self):
        """20000 boxes (hundreds of 64-box blocks) on the GPU against the CPU kernel."""
        n = 20000
        with self.case("nms", torch.float32, f"{n} boxes vs CPU kernel") as c:
            boxes = self.on(_boxes(self.gen, n, 256.0 * math.sqrt(n / 300)).float())
            boxes = boxes[_without_close_calls(boxes, [0.5], 1e-3)]
            scores = self.on(torch.rand(boxes.shape[0], generator=self.gen))
            classes = self.on(torch.randint(0, 80, (boxes.shape[0],), generator=self.gen))
            c.equal(maskops.nms(boxes, scores, 0.5), maskops.nms(boxes.cpu(), scores.cpu(), 0.5), "nms")
            c.equal(maskops.batched_nms(boxes, scores, classes, 0.5),
                    maskops.batched_nms(boxes.cpu(), scores.cpu(), classes.cpu(), 0.5), "batched_nms")
            c.equal(maskops.nms(boxes, scores, 0.5, max_output=100),
                    maskops.nms(boxes.cpu(), scores.cpu(), 0.5)[:100], "nms max_output 100")

    # ---- box IoU and area

    def check_boxes(self):
        for dtype in self.dtypes():
            a = _boxes(self.gen, 700 if self.full else 40).to(dtype)
            b = _boxes(self.gen, 500 if self.full else 31).to(dtype)
            if self.full:  # two equal zero-area boxes: union 0, IoU 0 (not NaN)
                a[0] = b[0] = torch.tensor([5.0, 5.0, 5.0, 9.0]).to(dtype)
            ref_i, ref_a = ref_iou(a, b), ref_area(a)
            label = f"{tuple(a.shape)} x {tuple(b.shape)}"
            # differences and products of exact inputs round once each: a few roundoffs
            t_i, t_a = _tol(dtype, 1.0, 8), _tol(dtype, _amax(ref_a), 4)
            with self.case("box_iou", dtype, "vs float64 ref") as c:
                got = maskops.box_iou(self.on(a), self.on(b))
                c.close(got, ref_i, t_i, label, dtype=dtype)
            with self.case("box_area", dtype, "vs float64 ref") as c:
                got_a = maskops.box_area(self.on(a))
                c.close(got_a, ref_a, t_a, label, dtype=dtype)
            if self.cuda:
                with self.case("box_iou", dtype, "box_iou+box_area vs CPU kernel") as c:
                    c.close(got, maskops.box_iou(a, b), 2 * t_i, "iou", dtype=dtype)
                    c.close(got_a, maskops.box_area(a), 2 * t_a, "area", dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("box_iou", dtype, "box_iou+box_area vs torchvision") as c:
                    ok = ref_area(a) > 0  # torchvision gives NaN where the union is 0
                    c.close(got[self.on(ok)], self.tv.ops.box_iou(self.on(a[ok]), self.on(b)), 2 * t_i, "iou")
                    c.close(got_a, self.tv.ops.box_area(self.on(a)), 2 * t_a, "area")
        self._gradcheck("box_iou", maskops.box_iou, [_boxes(self.gen, 4, 32.0, 2.0, 16.0),
                                                     _boxes(self.gen, 3, 32.0, 2.0, 16.0)], grad_args=(0, 1))
        self._gradcheck("box_area", maskops.box_area, [_boxes(self.gen, 5)], grad_args=(0,))

    # ---- anchors

    def check_anchors(self):
        # torchvision's FPN defaults on a 200x304 image (the last stride uneven) ...
        configs = [([(50, 76), (25, 38), (13, 19), (7, 10), (4, 5)],
                    [(4, 4), (8, 8), (16, 16), (32, 30), (50, 60)],
                    [(32,), (64,), (128,), (256,), (512,)], [(0.5, 1.0, 2.0)] * 5)]
        if self.full:  # an 800x1216 batch, three ratios
            configs.append(([(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)],
                            [(4, 4), (8, 8), (16, 16), (32, 32), (61, 64)],
                            [(32,), (64,), (128,), (256,), (512,)], [(0.5, 1.0, 2.0)] * 5))
        # ... and random sizes and ratios, none with a half-width within 1e-3 of a rounding tie
        levels = 3 if self.full else 2
        while len(configs) < (3 if self.full else 2):
            sizes = [tuple(int(v) for v in torch.randint(8, 400, (2,), generator=self.gen)) for _ in range(levels)]
            ratios = [tuple(round(float(v), 3) for v in 0.25 + 3.75 * torch.rand(2, generator=self.gen))
                      for _ in range(levels)]
            half = torch.cat([torch.cat([(torch.tensor(s, dtype=F64)[None] / torch.tensor(r, dtype=F64).sqrt()[:, None]).flatten(),
                                         (torch.tensor(s, dtype=F64)[None] * torch.tensor(r, dtype=F64).sqrt()[:, None]).flatten()]) / 2
                              for s, r in zip(sizes, ratios)])
            if bool(((half - half.floor() - 0.5).abs() < 1e-3).any()):
                continue
            grid = [tuple(int(v) for v in torch.randint(1, 30, (2,), generator=self.gen)) for _ in range(levels)]
            strides = [tuple(int(v) for v in torch.randint(2, 40, (2,), generator=self.gen)) for _ in range(levels)]
            configs.append((grid, strides, sizes, ratios))
        for dtype in self.dtypes():
            done = []
            with self.case("generate_anchors", dtype, "vs float64 ref") as c:
                for grid, strides, sizes, ratios in configs:
                    label = f"{len(grid)} levels, sizes {sizes[0]}.., ratios {ratios[0]}.."
                    with c.guard(label):
                        ref = ref_anchors(grid, strides, sizes, ratios)
                        got = maskops.generate_anchors(grid, strides, sizes, ratios, dtype=dtype,
                                                       device=self.device, cache=False)
                        if dtype in HALF_TYPES:
                            # whole numbers; a half type may round the cell anchor and the
                            # shift separately before adding (torchvision does): two roundings
                            c.close(got, ref, 2 * _rounding(dtype) * _amax(ref), label, dtype=dtype)
                        else:  # whole numbers, exact
                            c.equal(got, ref.to(dtype), label, dtype=dtype)
                        done.append((got, grid, strides, sizes, ratios, label))
            if self.cuda:
                with self.case("generate_anchors", dtype, "vs CPU kernel") as c:
                    for got, grid, strides, sizes, ratios, label in done:
                        c.equal(got, maskops.generate_anchors(grid, strides, sizes, ratios, dtype=dtype,
                                                              cache=False), label)

    # ---- box coding, clipping, small boxes

    def check_box_coding(self):
        weights = [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)]
        if self.full:
            weights.append((1.5, 2.5, 0.7, 3.3))
        clamp = math.log(1000.0 / 16)
        for dtype in self.dtypes():
            done_d, done_e = [], []
            with self.rows(("decode_boxes", dtype, "vs float64 ref"),
                           ("encode_boxes", dtype, "vs float64 ref")) as (dec, enc):
                for j, w in enumerate(weights):
                    n, k = (20000, 1) if self.full and j == 1 else (64, 3)
                    label = f"weights {w}"
                    boxes = _boxes(self.gen, n, 512.0, 4.0, 200.0).to(dtype)
                    codes = (torch.randn(n, 4 * k, generator=self.gen, dtype=F64)
                             * torch.tensor(w, dtype=F64).repeat(k) * 0.5)
                    codes[:3, 2] = 6.0 * w[2]  # past the clamp
                    codes = codes.to(dtype)
                    ref = ref_decode(codes, boxes, w, clamp)
                    # a coordinate is centre +- size / 2: roundoffs of the row's largest value,
                    # exp's argument carrying up to `clamp` of absolute error
                    scale = ref.abs().amax(-1, keepdim=True) + boxes.to(F64).abs().amax(-1)[:, None, None]
                    t = 8 * _u(dtype) * (1 + clamp) * scale + _rounding(dtype) * ref.abs()
                    with dec.guard(label):
                        got = maskops.decode_boxes(self.on(codes), self.on(boxes), w, clamp)
                        dec.close(got, ref, t, label, dtype=dtype)
                        done_d.append((codes, boxes, w, got, t, label))
                    gt = _boxes(self.gen, n, 512.0, 4.0, 200.0).to(dtype)
                    ref_e = ref_encode(gt, boxes, w)
                    # centre offsets are differences of coordinates, divided by the box size
                    b64 = boxes.to(F64)
                    rel = (torch.cat([gt.to(F64), b64], 1).abs().amax(1)
                           / torch.minimum(b64[:, 2] - b64[:, 0], b64[:, 3] - b64[:, 1]))
                    t_e = 16 * _u(dtype) * max(w) * (1 + rel)[:, None] + _rounding(dtype) * ref_e.abs()
                    with enc.guard(label):
                        got_e = maskops.encode_boxes(self.on(gt), self.on(boxes), w)
                        enc.close(got_e, ref_e, t_e, label, dtype=dtype)
                        done_e.append((gt, boxes, w, got_e, t_e, label))
            if self.cuda:
                with self.case("decode_boxes", dtype, "decode+encode vs CPU kernel") as c:
                    for codes, boxes, w, got, t, label in done_d:
                        c.close(got, maskops.decode_boxes(codes, boxes, w, clamp), 2 * t, "decode " + label)
                    for gt, boxes, w, got, t, label in done_e:
                        c.close(got, maskops.encode_boxes(gt, boxes, w), 2 * t, "encode " + label)
            if self.tv is not None and dtype in (torch.float32, F64):
                from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
                with self.case("decode_boxes", dtype, "decode+encode vs torchvision") as c:
                    for codes, boxes, w, got, t, label in done_d:
                        tv = TVBoxCoder(w, clamp).decode_single(self.on(codes), self.on(boxes))
                        c.close(got.flatten(1), tv, 2 * t.flatten(1), "decode " + label)
                    for gt, boxes, w, got, t, label in done_e:
                        tv = TVBoxCoder(w).encode_single(self.on(gt), self.on(boxes))
                        c.close(got, tv, 2 * t, "encode " + label)
        weights = (2.0, 3.0, 1.5, 0.5)
        self._gradcheck("decode_boxes", lambda c, b: maskops.decode_boxes(c, b, weights),
                        [torch.randn(3, 8, generator=self.gen, dtype=F64), _boxes(self.gen, 3, 64.0, 4.0, 32.0)],
                        grad_args=(0, 1))
        self._gradcheck("encode_boxes", lambda g, p: maskops.encode_boxes(g, p, weights),
                        [_boxes(self.gen, 4, 64.0, 4.0, 32.0), _boxes(self.gen, 4, 64.0, 4.0, 32.0)],
                        grad_args=(0, 1))

    def check_clip_small(self):
        for dtype in self.dtypes():
            done_c, done_s = [], []
            with self.rows(("clip_boxes", dtype, "vs float64 ref (exact)"),
                           ("remove_small_boxes", dtype, "vs float64 ref (exact)")) as (c_clip, c_small):
                for h, w in [(300, 400), (37, 1)]:
                    label = f"image {h}x{w}"
                    boxes = (_boxes(self.gen, 60, 500.0, 1.0, 200.0) - 100).to(dtype).reshape(3, 20, 4)
                    with c_clip.guard(label):  # clamping involves no rounding
                        got = maskops.clip_boxes(self.on(boxes), (h, w))
                        c_clip.equal(got, ref_clip(boxes.reshape(-1, 4), h, w).to(dtype).reshape(3, 20, 4),
                                     label, dtype=dtype)
                        done_c.append((boxes, (h, w), got, label))
                for min_size in (1e-3, 7.5, 30.0):
                    label = f"min_size {min_size:g}"
                    b = _boxes(self.gen, 200, 256.0, 0.0, 60.0).to(dtype).to(F64)
                    side = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
                    # sides are computed (rounded) in the boxes' dtype: none near min_size
                    b = b[(side - min_size).abs() > 4 * torch.finfo(dtype).eps * (side + min_size)]
                    ref = (((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)).nonzero().flatten()
                    boxes = b.to(dtype)
                    with c_small.guard(label):
                        got = maskops.remove_small_boxes(self.on(boxes), min_size)
                        c_small.equal(got, ref, label, dtype=torch.int64)
                        done_s.append((boxes, min_size, got, label))
            if self.cuda:
                with self.case("clip_boxes", dtype, "clip+remove_small vs CPU kernel") as c:
                    for boxes, hw, got, label in done_c:
                        c.equal(got, maskops.clip_boxes(boxes, hw), label)
                    for boxes, min_size, got, label in done_s:
                        c.equal(got, maskops.remove_small_boxes(boxes, min_size), label)
        b = _boxes(self.gen, 6, 60.0, 1.0, 30.0) - 10
        b = torch.where((b - b.round()).abs() < 1e-2, b + 0.1, b)  # no coordinate at a bound (kink)
        self._gradcheck("clip_boxes", lambda t: maskops.clip_boxes(t, (37, 41)), [b], grad_args=(0,))

    # ---- RPN proposals

    def check_rpn(self):
        # image sizes, padded batch size, strides, pre_nms_top_n, post_nms_top_n
        configs = [([(120, 150), (96, 160)], (128, 160), [4, 8], 150, 80)]
        if self.full:
            configs += [([(120, 150), (96, 160)], (128, 160), [4, 8, 16], 100, 60),
                        ([(800, 800), (752, 800)], (800, 800), [4, 8, 16, 32, 64], 1000, 1000)]
        nms_thr, min_size = 0.7, 1e-3
        for dtype in (torch.float32, F64):
            done = []
            with self.case("rpn_proposals", dtype, "vs float64 pipeline ref") as c:
                for ci, (image_sizes, (pad_h, pad_w), strides, pre, post) in enumerate(configs):
                    grid = [((pad_h + s - 1) // s, (pad_w + s - 1) // s) for s in strides]
                    anchors = ref_anchors(grid, [(s, s) for s in strides], [(8 * s,) for s in strides],
                                          [(0.5, 1.0, 2.0)] * len(strides))
                    per_level = [h * w * 3 for h, w in grid]
                    a, b = anchors.shape[0], len(image_sizes)
                    score_thr = 0.3 if ci == 1 else 0.0
                    # distinct logits (a shuffled grid): the top-k and the score order are clear
                    obj = torch.stack([torch.linspace(-4, 4, a, dtype=F64)[torch.randperm(a, generator=self.gen)]
                                       for _ in range(b)]).to(dtype)
                    deltas = (torch.randn(b, a, 4, generator=self.gen, dtype=F64) * 0.3).to(dtype)
                    anc = anchors.to(dtype)
                    args = (image_sizes, pre, post, nms_thr, score_thr, min_size, per_level)
                    label = f"{b} images {pad_h}x{pad_w}, {len(strides)} levels, pre {pre} post {post} score>={score_thr}"
                    with c.guard(label):
                        boxes, scores = maskops.rpn_proposals(self.on(obj), self.on(deltas), self.on(anc), *args)
                        close_calls = sum(
                            self._check_proposals(c, obj[i], deltas[i], anc, image_sizes[i], per_level, pre, post,
                                                  nms_thr, score_thr, min_size, boxes[i], scores[i],
                                                  f"image {i} of {label}")
                            for i in range(b))
                        done.append((obj, deltas, anc, args, boxes, scores, close_calls, label))
            if self.cuda:
                with self.case("rpn_proposals", dtype, "vs CPU kernel") as c:
                    for obj, deltas, anc, args, boxes, scores, close_calls, label in done:
                        cb, cs = maskops.rpn_proposals(obj, deltas, anc, *args)
                        for g_b, g_s, r_b, r_s in zip(boxes, scores, cb, cs):
                            t_b = 16 * _u(dtype) * (1 + math.log(1000 / 16)) * (1 + _amax(r_b))
                            t_s = _tol(dtype, 1.0, 16)
                            same = g_b.shape == r_b.shape and \
                                bool(((g_b.cpu().to(F64) - r_b.to(F64)).abs() <= t_b).all()) and \
                                bool(((g_s.cpu().to(F64) - r_s.to(F64)).abs() <= t_s).all())
                            if not same and close_calls:
                                # both were held to the reference above; they may part where
                                # an IoU or a size was within the margin of its threshold
                                c.note(f"{label}: differs from the CPU kernel after one of {close_calls} "
                                       "decisions too close to call (both agree with the reference)")
                                continue
                            c.close(g_b, r_b, t_b, label)
                            c.close(g_s, r_s, t_s, label)

    def _check_proposals(self, c: _Case, obj, deltas, anchors, image_hw, per_level, pre, post,
                         nms_thr, score_thr, min_size, got_boxes, got_scores, label) -> int:
        """One image's proposals against the float64 pipeline (per level top-k, decode, clip,
        size and score filters, per-level greedy NMS, the best ``post``). A decision within
        a margin of its threshold may go either way; returns how many were that close."""
        dtype = obj.dtype
        h, w = image_hw
        idx, lvl, start = [], [], 0
        for level, n in enumerate(per_level):
            idx.append(torch.topk(obj[start:start + n].to(F64), min(pre, n)).indices + start)
            lvl += [level] * len(idx[-1])
            start += n
        idx, lvl = torch.cat(idx), torch.tensor(lvl)
        score = torch.sigmoid(obj[idx].to(F64))
        boxes = ref_clip(ref_decode(deltas[idx], anchors[idx], (1.0, 1.0, 1.0, 1.0), math.log(1000.0 / 16))[:, 0], h, w)
        side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        m_side = 1e-4 * (1 + boxes.abs().amax(1))
        passes = (side >= min_size + m_side) & (score >= score_thr + 1e-6)
        fails = (side < min_size - m_side) | (score < score_thr - 1e-6)
        close_calls = int((~passes & ~fails).sum())
        if got_scores.dtype != dtype or got_boxes.dtype != deltas.dtype:
            c.fail(f"{label}: dtypes {got_boxes.dtype} / {got_scores.dtype}, expected {deltas.dtype} / {dtype}")
        gs = got_scores.detach().cpu().to(F64)
        if tuple(got_boxes.shape) != (gs.shape[0], 4) or gs.shape[0] > post:
            c.fail(f"{label}: {tuple(got_boxes.shape)} boxes, {tuple(gs.shape)} scores (at most {post})")
            return close_calls
        if bool((gs[1:] > gs[:-1]).any()):
            c.fail(f"{label}: scores are not in decreasing order")
        # each returned proposal is the candidate with its score (scores are far apart)
        match = (gs[:, None] - score[None, :]).abs().argmin(1)
        if len(set(match.tolist())) != len(match):
            c.fail(f"{label}: two proposals have the score of one candidate")
            return close_calls
        c.close(gs, score[match], _tol(dtype, 1.0, 16), f"{label} scores")
        scale = 1 + boxes[match].abs().amax(1, keepdim=True)
        c.close(got_boxes, boxes[match], 16 * _u(dtype) * (1 + math.log(1000 / 16)) * scale, f"{label} boxes")
        # greedy NMS per level over the candidates down to the last one returned
        returned = set(match.tolist())
        lowest = float(score[match].min()) if len(match) == post else -1.0
        kept: Dict[int, List[int]] = {}
        margin = 1e-3
        for j in torch.sort(score, descending=True).indices.tolist():
            if float(score[j]) < lowest:
                break
            others = kept.get(int(lvl[j]), [])
            ious = ref_iou(boxes[j:j + 1], boxes[others])[0]
            surely, maybe = bool((ious > nms_thr + margin).any()), bool((ious > nms_thr - margin).any())
            close_calls += int(maybe != surely)
            what = f"{label}: candidate {j} (level {int(lvl[j])}, score {float(score[j]):.6f})"
            if j in returned:
                if bool(fails[j]) or surely:
                    c.fail(f"{what} was returned but " + ("the size / score filter removes it" if bool(fails[j])
                                                          else "a kept box of its level suppresses it"))
                    return close_calls
                kept.setdefault(int(lvl[j]), []).append(j)
            elif bool(passes[j]) and not maybe:
                c.fail(f"{what} is missing: it passes the filters and no kept box suppresses it")
                return close_calls
        return close_calls

    # ---- mask paste and RLE

    def check_paste_masks(self):
        configs = [(12, 1, 28, 1, (100, 130))]  # masks N x C x M x M, padding, image
        if self.full:
            configs += [(7, 2, 14, 2, (64, 51)), (5, 1, 28, 0, (90, 90))]
        for dtype in self.dtypes():
            done = []
            with self.case("paste_masks", dtype, "vs float64 ref") as c:
                for n, ch, m, pad, (h, w) in configs:
                    masks = torch.rand(n, ch, m, m, generator=self.gen, dtype=F64).to(dtype)

                    def make(k, n=n, h=h, w=w):
                        k = n if k is None else k
                        lo = torch.tensor([w * 0.1, h * 0.1], dtype=F64)
                        xy = _rand(self.gen, k, 2) * torch.tensor([w * 1.2, h * 1.2], dtype=F64) - lo
                        wh = 0.3 + _rand(self.gen, k, 2) * torch.tensor([w * 0.6, h * 0.6], dtype=F64)
                        return torch.cat([xy, xy + wh], 1).to(torch.float32).to(F64)

                    # the grown box is truncated to whole pixels: no coordinate near a whole number
                    boxes = _redraw(make, lambda bx, m=m, pad=pad: _near_int(_expanded_boxes(bx, m, pad), 1e-3).any(1))
                    boxes = boxes.to(torch.float32)
                    ref = ref_paste(masks, boxes, h, w, pad)
                    # resampling positions carry roundoff u * (padded mask size); values in [0, 1]
                    t = _tol(dtype, 1 + m + 2 * pad, 8, 1.0)
                    label = f"{n}x{ch}x{m}x{m} pad {pad} -> {h}x{w}"
                    with c.guard(label):
                        got = maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=None, padding=pad)
                        c.close(got, ref, t, label, dtype=dtype)
                        done.append((masks, boxes, (h, w), pad, got, t, label))
                    for thr, u8 in ((0.5, False), (0.3, True)):
                        lab = f"{label} >= {thr}"
                        with c.guard(lab):
                            got_t = maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=thr,
                                                        padding=pad, as_uint8=u8)
                            want = torch.uint8 if u8 else torch.bool
                            if got_t.shape != ref.shape or got_t.dtype != want:
                                c.fail(f"{lab}: {got_t.dtype} {tuple(got_t.shape)}, expected {want} {tuple(ref.shape)}")
                                continue
                            sure = (ref - thr).abs() > t  # a pixel at the threshold may go either way
                            c.equal(got_t.cpu()[sure], (ref >= thr).to(want)[sure], lab)
            if self.cuda:
                with self.case("paste_masks", dtype, "vs CPU kernel") as c:
                    for masks, boxes, hw, pad, got, t, label in done:
                        c.close(got, maskops.paste_masks(masks, boxes, hw, threshold=None, padding=pad), 2 * t, label)
            if self.tv is not None and dtype in (torch.float32, F64):
                from torchvision.models.detection.roi_heads import paste_masks_in_image
                with self.case("paste_masks", dtype, "vs torchvision") as c:
                    for masks, boxes, (h, w), pad, got, t, label in done:
                        if masks.shape[1] != 1:  # torchvision pastes one channel
                            continue
                        # and fails on a box that ends up wholly outside the image: leave those out
                        e = _expanded_boxes(boxes, masks.shape[-1], pad).trunc()
                        inside = (e[:, 2] + 1 >= e[:, 0].clamp(min=0)) & (e[:, 0] <= w) & \
                            (e[:, 3] + 1 >= e[:, 1].clamp(min=0)) & (e[:, 1] <= h)
                        tv = paste_masks_in_image(self.on(masks[inside]), self.on(boxes[inside].to(dtype)), (h, w), pad)
                        c.close(got[self.on(inside)], tv, 2 * t, label)
        if self.cuda and self.full:
            self._large_paste()

    def _large_paste(self):
        """100 masks into an 800x800 image on the GPU against the CPU kernel."""
        n, m, h, w = 100, 28, 800, 800
        with self.case("paste_masks", torch.float32, f"{n} masks, {h}x{w} vs CPU kernel") as c:
            masks = torch.rand(n, 1, m, m, generator=self.gen)

            def make(k):
                k = n if k is None else k
                xy = _rand(self.gen, k, 2) * (w * 0.9)
                return torch.cat([xy, xy + 5 + _rand(self.gen, k, 2) * 300], 1).float().to(F64)

            boxes = _redraw(make, lambda bx: _near_int(_expanded_boxes(bx, m, 1), 1e-3).any(1)).float()
            t = _tol(torch.float32, 1 + m + 2, 8)
            ref = maskops.paste_masks(masks, boxes, (h, w), threshold=None)
            c.close(maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=None), ref, t, "float")
            got = maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=0.5).cpu()
            sure = (ref - 0.5).abs() > t
            c.equal(got[sure], (ref >= 0.5)[sure], ">= 0.5")

    def check_rle(self):
        with self.case("masks_to_rle", "bool/uint8", "vs reference encoder (exact)") as c:
            shapes = [(6, 37, 23), (3, 1, 9)] + ([(4, 64, 80), (2, 5, 1)] if self.full else [])
            for n, h, w in shapes:
                noise = torch.rand(n, h, w, generator=self.gen) < 0.5
                blob = torch.zeros(n, h, w, dtype=torch.bool)
                blob[:, h // 4: 3 * h // 4 + 1, w // 3: 2 * w // 3 + 1] = True
                m = torch.where(torch.arange(n)[:, None, None] % 2 == 0, noise, blob)
                m[0] = False  # empty
                if n > 2:
                    m[1] = True  # full
                for kind in ("bool", "uint8"):
                    x = m if kind == "bool" else \
                        m.to(torch.uint8) * torch.randint(1, 256, (n, h, w), generator=self.gen, dtype=torch.uint8)
                    label = f"{n}x{h}x{w} {kind}"
                    c.row.cases += 1
                    with c.guard(label):
                        got = maskops.masks_to_rle(self.on(x))
                        if len(got) != n:
                            c.fail(f"{label}: {len(got)} encodings for {n} masks")
                            continue
                        for i, r in enumerate(got):
                            want = {"size": [h, w], "counts": ref_rle(m[i])}
                            if r != want:
                                c.fail(f"{label}: mask {i}: {str(r)[:70]} != {str(want)[:70]}")
                                break
            c.row.max_error, c.row.tolerance = 0.0, 0.0

    # ---- opcheck

    def check_opcheck(self):
        """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
        ops, g = torch.ops.maskops, self.gen

        def grad(t):
            return t.requires_grad_()

        x = torch.randn(2, 3, 9, 11, generator=g, dtype=F64)
        rois = torch.cat([torch.randint(0, 2, (6, 1), generator=g).to(F64), _boxes(g, 6, 36.0, 2.0, 18.0)], 1)
        levels = [torch.randn(2, 3, 16, 16, generator=g, dtype=F64), torch.randn(2, 3, 8, 8, generator=g, dtype=F64)]
        boxes = _boxes(g, 50, 100.0).to(torch.float32)
        scores = torch.rand(50, generator=g)
        idxs = torch.randint(0, 3, (50,), generator=g)
        codes = torch.randn(50, 8, generator=g, dtype=F64)
        masks = torch.rand(4, 1, 7, 7, generator=g)
        anchors = ref_anchors([(6, 8), (3, 4)], [(4, 4), (8, 8)], [(8,), (16,)], [(0.5, 1.0, 2.0)] * 2).float()
        per_level = [6 * 8 * 3, 3 * 4 * 3]
        samples = {
            "roi_align": [(ops.roi_align, (grad(x), rois, 0.25, 3, 4, 2, True)),
                          (ops.roi_align, (x.float().contiguous(memory_format=torch.channels_last),
                                           rois.float(), 0.5, 2, 3, -1, False))],
            "_roi_align_backward": [(ops._roi_align_backward, (torch.randn(6, 3, 4, 5, generator=g, dtype=F64),
                                                               rois, 0.25, 4, 5, 2, 3, 9, 11, 2, True))],
            "multiscale_roi_align": [(ops.multiscale_roi_align, ([grad(t) for t in levels], rois, [0.25, 0.125],
                                                                 3, 3, 2, False, 16.0, 4.0, 2))],
            "_multiscale_roi_align_backward": [(ops._multiscale_roi_align_backward,
                                                (torch.randn(6, 3, 3, 3, generator=g, dtype=F64), rois, [0.25, 0.125],
                                                 3, 3, 2, 3, [16, 8], [16, 8], 2, False, 16.0, 4.0, 2))],
            "nms": [(ops.nms, (boxes, scores, 0.5)), (ops.nms, (boxes.half(), scores, 0.5, 0.2, 10))],
            "batched_nms": [(ops.batched_nms, (boxes, scores, idxs, 0.5))],
            "box_iou": [(ops.box_iou, (grad(boxes[:7].double()), grad(boxes[3:20].double())))],
            "box_area": [(ops.box_area, (grad(boxes.double()),))],
            "generate_anchors": [(ops.generate_anchors, (torch.tensor([32.0, 64.0, 96.0]), torch.tensor([0.5, 1.0, 2.0, 1.0]),
                                                         [2, 1], [3, 1], [5, 7, 3, 4], [4, 4, 8, 9], torch.float32))],
            "decode_boxes": [(ops.decode_boxes, (grad(codes), grad(boxes.double()), [10.0, 10.0, 5.0, 5.0], 4.0))],
            "encode_boxes": [(ops.encode_boxes, (grad(boxes.double()), grad(boxes.flip(0).double()), [1.0, 1.0, 1.0, 1.0]))],
            "clip_boxes": [(ops.clip_boxes, (grad((boxes - 20).double()), 60, 70))],
            "remove_small_boxes": [(ops.remove_small_boxes, (boxes, 30.0))],
            "rpn_proposals": [(ops.rpn_proposals, (torch.randn(2, sum(per_level), generator=g),
                                                   torch.randn(2, sum(per_level), 4, generator=g) * 0.2, anchors,
                                                   [24, 32, 20, 30], 40, 20, 0.7, 0.0, 1e-3, per_level))],
            "paste_masks": [(ops.paste_masks, (masks, boxes[:4], 40, 50, 1, None, False)),
                            (ops.paste_masks, (masks, boxes[:4], 40, 50, 1, 0.5, False))],
        }
        if not self.cuda:  # a host-side op: CUDA masks are encoded from a CPU copy
            samples["_masks_to_rle"] = [(ops._masks_to_rle, (torch.rand(3, 9, 7, generator=g) < 0.5,))]

        def move(a):
            if isinstance(a, torch.Tensor):
                return self.leaf(a) if a.requires_grad else a.to(self.device)
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                return [move(t) for t in a]
            return a

        for name, entries in samples.items():
            with self.case(name, "-", "opcheck") as c:
                for op, args in entries:
                    with c.guard(f"{name}{tuple(getattr(a, 'shape', a) for a in args[:2])}"):
                        torch.library.opcheck(op.default, tuple(move(a) for a in args))
                        c.row.cases += 1


# group name -> (method, ops it covers)
GROUPS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "roi_align": ("check_roi_align", ("roi_align",)),
    "multiscale_roi_align": ("check_multiscale_roi_align", ("multiscale_roi_align",)),
    "nms": ("check_nms", ("nms", "batched_nms")),
    "boxes": ("check_boxes", ("box_iou", "box_area")),
    "anchors": ("check_anchors", ("generate_anchors",)),
    "box_coding": ("check_box_coding", ("encode_boxes", "decode_boxes")),
    "clip": ("check_clip_small", ("clip_boxes", "remove_small_boxes")),
    "rpn": ("check_rpn", ("rpn_proposals",)),
    "paste_masks": ("check_paste_masks", ("paste_masks",)),
    "rle": ("check_rle", ("masks_to_rle",)),
    "opcheck": ("check_opcheck", ("opcheck",)),
}


def _select_groups(ops: Optional[Sequence[str]]) -> List[str]:
    if not ops:
        return list(GROUPS)
    wanted = {o.strip() for o in ops if o.strip()}
    known = {name for name in GROUPS} | {op for _, covered in GROUPS.values() for op in covered}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [g for g, (_, covered) in GROUPS.items() if g in wanted or wanted & set(covered)]


# ============================================================================ devices

def _resolve_devices(spec: Optional[str]) -> Tuple[List[str], List[Result]]:
    """Device names to check, and failure rows for devices that were asked for but are absent."""
    parts = [p.strip() for p in (spec or "all").split(",") if p.strip()]
    out, problems = [], []
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for p in parts:
        if p == "all":
            out += ["cpu"] + [f"cuda:{i}" for i in range(n_cuda)]
        elif p == "cpu":
            out.append("cpu")
        elif p == "cuda" or re.fullmatch(r"cuda:\d+", p):
            if n_cuda == 0:
                why = ("this torch has no CUDA support" if torch.version.cuda is None
                       else "torch.cuda.is_available() is False (no GPU visible, or a driver problem)")
                problems.append(Result("device", p, "-", "present", False,
                                       detail=f"{p} was asked for but {why}"))
            elif p == "cuda":
                out += [f"cuda:{i}" for i in range(n_cuda)]
            elif int(p.split(":")[1]) >= n_cuda:
                problems.append(Result("device", p, "-", "present", False,
                                       detail=f"{p} was asked for but only {n_cuda} CUDA device(s) are visible"))
            else:
                out.append(p)
        else:
            raise ValueError(f"unknown device {p!r}: use cpu, cuda, cuda:N or all")
    seen = []
    for d in out:
        if d not in seen:
            seen.append(d)
    return seen, problems


def _device_label(dev: str) -> str:
    if dev == "cpu":
        return f"cpu ({cpu.features().summary()}; {torch.get_num_threads()} threads)"
    i = int(dev.split(":")[1])
    return f"{dev} ({torch.cuda.get_device_name(i)}, sm_%d%d)" % torch.cuda.get_device_capability(i)


# ============================================================================ benchmark

def _median_ms(fn, device: torch.device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench(device: str, gen: Optional[torch.Generator] = None) -> List[dict]:
    """Short timings of maskops and torchvision on the same inputs, same process (medians)."""
    dev = torch.device(device)
    gen = gen or torch.Generator().manual_seed(0)
    try:
        import torchvision
    except Exception:  # noqa: BLE001
        torchvision = None
    gpu = dev.type == "cuda"
    reps = 20 if gpu else 5
    k, ch, fm = (1000, 256, 50) if gpu else (256, 64, 50)
    image = 800 if gpu else 400
    x = torch.randn(2, ch, fm, fm, generator=gen).to(dev)
    rois = torch.cat([torch.randint(0, 2, (k, 1), generator=gen).float(),
                      _boxes(gen, k, fm * 16.0, 16.0, fm * 8.0).float()], 1).to(dev)
    feats = {f"p{i}": torch.randn(2, ch, image // 2 ** (i + 2), image // 2 ** (i + 2), generator=gen).to(dev)
             for i in range(4)}
    per_image = [_boxes(gen, k // 2, float(image), 16.0, image / 2).float().to(dev) for _ in range(2)]
    n_nms = 20000 if gpu else 5000
    nb = _boxes(gen, n_nms, 800.0, 4.0, 120.0).float().to(dev)
    ns = torch.rand(n_nms, generator=gen).to(dev)
    nc = torch.randint(0, 80, (n_nms,), generator=gen).to(dev)
    n_masks, m_image = (100, 800) if gpu else (50, 400)
    masks = torch.rand(n_masks, 1, 28, 28, generator=gen).to(dev)
    mboxes = _boxes(gen, n_masks, m_image * 0.8, 10.0, m_image / 3).float().to(dev)
    codes = torch.randn(100000, 4, generator=gen).to(dev) * 0.2
    cboxes = _boxes(gen, 100000, 800.0).float().to(dev)
    rows = []

    def add(op, workload, ours, theirs):
        t_ours = _median_ms(ours, dev, reps)
        t_tv = _median_ms(theirs, dev, reps) if (theirs is not None and torchvision is not None) else None
        rows.append({"op": op, "device": device, "workload": workload, "maskops_ms": round(t_ours, 4),
                     "torchvision_ms": None if t_tv is None else round(t_tv, 4),
                     "speedup": None if t_tv is None else round(t_tv / t_ours, 2)})

    tv = torchvision.ops if torchvision is not None else None
    work = f"{k} RoIs x {ch} ch, {fm}x{fm} map, 7x7"
    add("roi_align forward", work, lambda: maskops.roi_align(x, rois, 7, 1 / 16, 2, True),
        tv and (lambda: tv.roi_align(x, rois, 7, 1 / 16, 2, True)))
    xg = x.clone().requires_grad_()

    def fb(fn):
        def step():
            out = fn(xg, rois, 7, 1 / 16, 2, True)
            torch.autograd.grad(out, xg, torch.ones_like(out))
        return step

    add("roi_align fwd+bwd", work, fb(maskops.roi_align), tv and fb(tv.roi_align))
    names = list(feats)
    ours_pool = maskops.MultiScaleRoIAlign(names, 7, 2)
    tv_pool = tv.MultiScaleRoIAlign(names, 7, 2) if tv else None
    add("MultiScaleRoIAlign forward", f"{k} RoIs, 4 levels of {image}x{image}, {ch} ch, 7x7",
        lambda: ours_pool(feats, per_image, [(image, image)] * 2),
        tv_pool and (lambda: tv_pool(feats, per_image, [(image, image)] * 2)))
    add("nms", f"{n_nms} boxes", lambda: maskops.nms(nb, ns, 0.5), tv and (lambda: tv.nms(nb, ns, 0.5)))
    add("batched_nms", f"{n_nms} boxes, 80 classes", lambda: maskops.batched_nms(nb, ns, nc, 0.5),
        tv and (lambda: tv.batched_nms(nb, ns, nc, 0.5)))
    add("box_iou", "1000 x 1000", lambda: maskops.box_iou(nb[:1000], nb[1000:2000]),
        tv and (lambda: tv.box_iou(nb[:1000], nb[1000:2000])))
    if torchvision is not None:
        from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
        from torchvision.models.detection.roi_heads import paste_masks_in_image
        tv_coder = TVBoxCoder((10.0, 10.0, 5.0, 5.0))
    add("paste_masks to bool", f"{n_masks} masks 28x28 into {m_image}x{m_image}",
        lambda: maskops.paste_masks(masks, mboxes, (m_image, m_image), threshold=0.5),
        torchvision and (lambda: paste_masks_in_image(masks, mboxes, (m_image, m_image)) >= 0.5))
    add("decode_boxes", "100000 boxes", lambda: maskops.decode_boxes(codes, cboxes, (10.0, 10.0, 5.0, 5.0)),
        torchvision and (lambda: tv_coder.decode_single(codes, cboxes)))
    fsizes = [(image // 2 ** i, image // 2 ** i) for i in range(2, 7)]
    tv_anchors = None
    if torchvision is not None:
        from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
        from torchvision.models.detection.image_list import ImageList
        gen_tv = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        images = ImageList(torch.zeros(1, 3, image, image, device=dev), [(image, image)])
        maps = [torch.zeros(1, 1, h, w, device=dev) for h, w in fsizes]
        tv_anchors = lambda: gen_tv(images, maps)
    add("generate_anchors (uncached)", f"5 FPN levels of {image}x{image}, 3 ratios",
        lambda: maskops.generate_anchors(fsizes, [2 ** i for i in range(2, 7)], [32, 64, 128, 256, 512],
                                         device=dev, cache=False),
        tv_anchors)
    return rows


# ============================================================================ run and report

_COLUMNS = (("op", 30), ("device", 7), ("dtype", 10), ("check", 38), ("result", 6), ("max error", 10), ("tolerance", 10))


def _fmt_num(v: Optional[float], exact_zero: bool = False) -> str:
    if v is None:
        return "-"
    if exact_zero and v == 0:
        return "exact"
    return f"{v:.2e}"


def format_row(r: Result) -> str:
    cells = [r.op, r.device, r.dtype, r.check, "ok" if r.ok else "FAIL", _fmt_num(r.max_error),
             _fmt_num(r.tolerance, exact_zero=True)]
    line = " ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLUMNS)).rstrip()
    if not r.ok and r.detail:
        line += f"\n    -> {r.detail}"
    return line


def _header_lines(info: dict, devices: List[str], mode: str, seed: int) -> List[str]:
    arch = info.get("cuda_arch_list") or ("-" if not info.get("with_cuda") else "visible GPUs at build time")
    lines = [f"maskops {info.get('version', maskops.__version__)} self-check ({mode}, seed {seed}), "
             f"imported from {os.path.dirname(os.path.abspath(maskops.__file__))}",
             f"build: torch {info.get('torch')}, CUDA {info.get('cuda') or '-'}, arch list {arch}, "
             f"CUDA kernels {'yes' if info.get('has_cuda_kernels') else 'no'}",
             f"runtime: torch {info.get('runtime_torch')} (CUDA {info.get('runtime_cuda') or '-'}), "
             f"python {platform.python_version()}",
             f"cpu: {cpu.features().summary()}; {torch.get_num_threads()} threads"]
    for g in info.get("gpus", []):
        lines.append(f"gpu: cuda:{g['index']} {g['name']}, compute capability {g['capability']}")
    lines.append("devices checked: " + (", ".join(devices) if devices else "none"))
    return lines


def run(quick: bool = False, devices: Optional[str] = None, ops: Optional[Sequence[str]] = None,
        bench_speed: bool = False, seed: Optional[int] = None, json_path: Optional[str] = None,
        out=None) -> Report:
    """Runs the self-check and prints its table to ``out`` (default stdout; None-like: quiet
    is ``out=open(os.devnull, "w")``). Returns a :class:`Report`; ``report.ok`` says whether
    everything passed.

    Args:
        quick: fewer shapes and dtypes (seconds instead of minutes on a CPU).
        devices: "all" (default: the CPU and every visible GPU), "cpu", "cuda" (every visible
            GPU), "cuda:N", or a comma-separated list.
        ops: only these ops / groups (e.g. ``["roi_align", "nms"]``).
        bench_speed: add a short speed table against torchvision.
        seed: the random inputs' seed (default: a fresh one, printed).
        json_path: also write the report as JSON there ("-": stdout; the table then goes to
            stderr).
    """
    t_start = time.perf_counter()
    if out is None:
        out = sys.stderr if json_path == "-" else sys.stdout
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
    groups = _select_groups(ops)
    names, problems = _resolve_devices(devices)
    info = maskops.build_info()
    mode = "quick" if quick else "full"
    report = Report(ok=True, mode=mode, seed=seed, devices=[], build_info=info,
                    location=os.path.dirname(os.path.abspath(maskops.__file__)))

    def emit(row: Result) -> None:
        print(format_row(row), file=out, flush=True)

    for line in _header_lines(info, names, mode, seed):
        print(line, file=out)
    print(file=out)
    print(" ".join(name.ljust(w) for name, w in _COLUMNS).rstrip(), file=out)
    print("-" * (sum(w for _, w in _COLUMNS) + len(_COLUMNS) - 1), file=out, flush=True)
    for row in problems:
        report.results.append(row)
        emit(row)
    for name in names:
        if name.startswith("cuda"):
            index = int(name.split(":")[1])
            problem = cuda_device_problem(index, info)
            row = Result("CUDA kernels", name, "-", "run on this GPU", problem is None, detail=problem or "")
            report.results.append(row)
            emit(row)
            if problem:
                continue
        report.devices.append(_device_label(name))
        checker = _Checker(torch.device(name), full=not quick, gen=torch.Generator().manual_seed(seed), emit=emit)
        for group in groups:
            getattr(checker, GROUPS[group][0])()
        report.results += checker.results
        if bench_speed:
            try:
                report.bench += bench(name, torch.Generator().manual_seed(seed))
            except Exception as e:  # noqa: BLE001 - a benchmark problem is reported, not fatal
                report.results.append(Result("benchmark", name, "-", "runs", False, detail=_first_line(e)))
                emit(report.results[-1])
    report.ok = all(r.ok for r in report.results) and bool(report.results)
    report.seconds = round(time.perf_counter() - t_start, 2)
    if report.bench:
        print(file=out)
        print(format_bench(report.bench), file=out)
    print(file=out)
    n = len(report.results)
    if report.ok:
        print(f"OK: all {n} checks passed on {', '.join(d.split(' ')[0] for d in report.devices)} "
              f"in {report.seconds:.1f} s", file=out, flush=True)
    else:
        fails = report.failures or [Result("-", "-", "-", "nothing was checked", False)]
        listed = "; ".join(f"{r.op} {r.check} ({r.device}, {r.dtype})" for r in fails[:6])
        more = f" and {len(fails) - 6} more" if len(fails) > 6 else ""
        print(f"FAILED: {len(fails)} of {n} checks: {listed}{more}", file=out, flush=True)
    if json_path:
        text = json.dumps(report.to_dict(), indent=1, default=str)
        if json_path == "-":
            print(text, flush=True)
        else:
            with open(json_path, "w") as f:
                f.write(text + "\n")
    return report


def format_bench(rows: List[dict]) -> str:
    lines = [f"{'benchmark':28} {'device':7} {'workload':46} {'maskops':>10} {'torchvision':>12} {'speed-up':>8}"]
    for r in rows:
        tv = "-" if r["torchvision_ms"] is None else f"{r['torchvision_ms']:.3f} ms"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"{r['op']:28} {r['device']:7} {r['workload']:46} {r['maskops_ms']:>7.3f} ms {tv:>12} {sp:>8}")
    lines.append("(medians of a few repetitions in this process, same inputs; speed-up = torchvision / maskops)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskops.check",
                                description="Check that maskops' compiled kernels give right answers on this machine.")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (seconds)")
    p.add_argument("--device", default="all",
                   help="all (default: the CPU and every visible GPU), cpu, cuda (every GPU), cuda:N; comma-separated")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the results as JSON to PATH (no PATH: to stdout, the table to stderr)")
    p.add_argument("--bench", action="store_true", help="add a short speed table against torchvision")
    p.add_argument("--ops", default="", help=f"only these (comma-separated): {', '.join(GROUPS)} or op names")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
    args = p.parse_args(argv)
    try:
        report = run(quick=args.quick, devices=args.device, ops=args.ops.split(",") if args.ops else None,
                     bench_speed=args.bench, seed=args.seed, json_path=args.json)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
