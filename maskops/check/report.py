"""The report: one :class:`Result` row per (op, device, dtype, check), the :class:`Report`
of a run, the :class:`Case` that collects one row's comparisons, and their text forms."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from .machine import machine
from .tolerances import F64


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


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
    detail: str = ""  # the worst case, or what failed
    cases: int = 0  # comparisons made
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
        d["machine"] = machine()  # the record the benchmarks keep with their numbers
        d["cpu"] = d["machine"]["cpu_record"]
        return d


class Case:
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

    def close(
        self,
        got: torch.Tensor,
        ref: torch.Tensor,
        tol,
        label: str = "",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
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
        ratio = torch.where(t > 0, diff / t.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
        i = int(ratio.flatten().argmax())
        worst, err, at = float(ratio.flatten()[i]), float(diff.flatten()[i]), float(t.flatten()[i])
        if worst > self._ratio:
            self._ratio, self.row.max_error, self.row.tolerance = worst, err, at
            self.row.detail = f"worst: {label}" if label else ""
        if not worst <= 1.0:
            where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), r.shape))
            self.fail(
                f"{label}: error {err:.3g} > tolerance {at:.3g} at {where} "
                f"(got {float(g.flatten()[i]):.6g}, expected {float(r.flatten()[i]):.6g})"
            )

    def equal(
        self,
        got: torch.Tensor,
        ref: torch.Tensor,
        label: str = "",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
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
            self.fail(
                f"{label}: {k} of {r.numel()} elements differ, first at flat index {i} "
                f"(got {gi}, expected {ri})"
            )
            err = abs(float(gi) - float(ri)) if not isinstance(gi, bool) else 1.0
        if self.row.max_error is None or err > self.row.max_error:
            self.row.max_error = err
            if self.row.tolerance is None:
                self.row.tolerance = 0.0

    def guard(self, label: str, *others: "Case"):
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
def _guard(label: str, *cases: Case):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        for c in cases:
            c.row.cases += 1
            c.fail(f"{label}: {first_line(e)}")


COLUMNS = (
    ("op", 30),
    ("device", 7),
    ("dtype", 10),
    ("check", 38),
    ("result", 6),
    ("max error", 10),
    ("tolerance", 10),
)


def _fmt_num(v: Optional[float], exact_zero: bool = False) -> str:
    if v is None:
        return "-"
    if exact_zero and v == 0:
        return "exact"
    return f"{v:.2e}"


def format_row(r: Result) -> str:
    cells = [
        r.op,
        r.device,
        r.dtype,
        r.check,
        "ok" if r.ok else "FAIL",
        _fmt_num(r.max_error),
        _fmt_num(r.tolerance, exact_zero=True),
    ]
    line = " ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS)).rstrip()
    if not r.ok and r.detail:
        line += f"\n    -> {r.detail}"
    return line


def format_bench(rows: List[dict]) -> str:
    lines = [
        f"{'benchmark':28} {'device':7} {'workload':46} {'maskops':>10} {'torchvision':>12} "
        f"{'speed-up':>8}"
    ]
    for r in rows:
        tv = "-" if r["torchvision_ms"] is None else f"{r['torchvision_ms']:.3f} ms"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(
            f"{r['op']:28} {r['device']:7} {r['workload']:46} {r['maskops_ms']:>7.3f} ms "
            f"{tv:>12} {sp:>8}"
        )
    lines.append(
        "(medians of a few repetitions in this process, same inputs; "
        "speed-up = torchvision / maskops)"
    )
    return "\n".join(lines)
