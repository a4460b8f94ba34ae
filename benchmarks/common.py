"""Shared timing and reporting helpers for the side-by-side benchmarks."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from maskops import cpu

# The one timing loop and machine record, shared with `python -m maskops.check --bench`;
# the bench_*.py files take them from here.
from maskops.check.machine import machine
from maskops.check.timing import Timing, measure, measure_interleaved

__all__ = [
    "machine",
    "Timing",
    "measure",
    "measure_interleaved",
    "on_one_thread",
    "measure_uncached",
    "Row",
    "check_same",
    "table",
    "save_json",
    "nbytes",
    "copy_bandwidth_GBps",
    "roofline_table",
    "device_slug",
    "markdown_report",
    "cli",
]


def on_one_thread(fn):
    """fn() with torch's intra-op threads set to one, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def measure_uncached(fn, device: str = "cpu", reps: int = 7, warmup: int = 1) -> Timing:
    """measure() with maskops' CPU buffer cache off (maskops/memory.py): every call maps fresh
    memory, as for outputs a caller keeps rather than frees."""
    import maskops

    previous = maskops.set_cpu_cache_limit(0)
    try:
        return measure(fn, device, reps, warmup)
    finally:
        maskops.set_cpu_cache_limit(previous)


@dataclass
class Row:
    op: str
    device: str
    case: str
    maskops: Timing
    torchvision: Timing
    note: str = ""
    min_bytes: float = 0.0  # fewest bytes the op must move: inputs read once, outputs written once
    flops: float = 0.0  # floating-point operations of the algorithm (an estimate, stated per op)

    @property
    def ratio(self) -> float:
        return self.torchvision.median_ms / self.maskops.median_ms


def check_same(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """The correctness guard: no speed is reported for a wrong result."""
    if got.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(got.shape)} != torchvision's {tuple(expected.shape)}"
        )
    err = (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0
    if not err <= atol:
        raise AssertionError(
            f"{name}: differs from torchvision by {err:.3g} (> {atol}); "
            "refusing to report its speed"
        )


def table(rows: list[Row]) -> str:
    lines = [
        "| op | device | case | maskops ms (IQR) | torchvision ms (IQR) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.device} | {r.case} | {r.maskops.median_ms:.2f} "
            f"({r.maskops.iqr_ms:.2f}) "
            f"| {r.torchvision.median_ms:.2f} ({r.torchvision.iqr_ms:.2f}) | **{r.ratio:.1f}x**"
            f"{' ' + r.note if r.note else ''} |"
        )
    return "\n".join(lines)


def save_json(path: str, rows: list[Row], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {
        "machine": machine(),
        "rows": [
            {
                **{k: v for k, v in asdict(r).items() if k not in ("maskops", "torchvision")},
                **(
                    {"achieved_GBps": r.min_bytes / r.maskops.median_ms / 1e6}
                    if r.min_bytes
                    else {}
                ),
                "maskops_ms": r.maskops.median_ms,
                "maskops_iqr_ms": r.maskops.iqr_ms,
                "torchvision_ms": r.torchvision.median_ms,
                "torchvision_iqr_ms": r.torchvision.iqr_ms,
                "ratio": r.ratio,
            }
            for r in rows
        ],
    }
    if extra:
        payload.update(extra)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def nbytes(*tensors) -> float:
    """Total size of tensors (or lists of tensors) in bytes."""
    total = 0
    for t in tensors:
        if isinstance(t, (list, tuple)):
            total += nbytes(*t)
        elif isinstance(t, dict):
            total += nbytes(*t.values())
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return float(total)


def copy_bandwidth_GBps(device: str, size_mb: int = 1024) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = size_mb * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, reps=10, warmup=2)
    return 2 * n * 4 / (t.median_ms / 1e3) / 1e9


def roofline_table(rows: list[Row], copy_GBps: float) -> str:
    lines = [
        f"Measured device-to-device copy bandwidth: **{copy_GBps:.0f} GB/s** (read + write).",
        "",
        "| op | case | min bytes (MB) | GFLOP | maskops ms | achieved GB/s | of copy bandwidth "
        "| GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.min_bytes:
            continue
        gbps = r.min_bytes / (r.maskops.median_ms / 1e3) / 1e9
        gflop = r.flops / 1e9
        lines.append(
            f"| {r.op} | {r.case} | {r.min_bytes / 1e6:.1f} | {gflop:.2f} "
            f"| {r.maskops.median_ms:.3f} | {gbps:.0f} | {100 * gbps / copy_GBps:.0f} % "
            f"| {gflop / (r.maskops.median_ms / 1e3):.0f} |"
        )
    return "\n".join(lines)


def device_slug(device: str) -> str:
    """A file-name-safe name for the machine behind `device` (the GPU model, or the CPU)."""
    import re

    m = machine()
    name = (
        m["gpu"]
        if device.startswith("cuda") and m["gpu"]
        else f"cpu-{m['cpu']}-{m['cpu_threads']}threads"
    )
    f = cpu.features()
    if not device.startswith("cuda") and f.isa != f.isa_supported:
        name += f"-{f.isa}"  # maskops' kernels capped (MASKOPS_CPU_ISA): a file of its own
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown_report(device: str, rows: list[Row], extra: str = "") -> str:
    m = machine()
    head = [
        f"# maskops vs torchvision on {m['gpu'] if device.startswith('cuda') else m['cpu']}",
        "",
        "| machine | |",
        "|---|---|",
    ]
    head += [f"| {k} | {v} |" for k, v in m.items()]
    body = [
        "",
        "Medians (interquartile range) of repeated calls in one process, same inputs for "
        "both libraries; every maskops result was checked against torchvision's first. "
        "Each call's output is freed before the next, so on the CPU maskops reuses it "
        'through its buffer cache (maskops/memory.py); rows marked "no cache" turn '
        "the cache off (fresh memory every call).",
        "",
        table(rows),
    ]
    return "\n".join(head + body + (["", extra] if extra else [])) + "\n"


def cli(run, doc: str, argv=None) -> None:
    """The command line every bench_*.py shares: --quick, --device, --json."""
    import argparse

    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default=None, help="cpu or cuda (default: every available one)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for d in devices:
        rows += run(d, a.quick)
    print(machine())
    print(table(rows))
    if a.json:
        save_json(a.json, rows)
