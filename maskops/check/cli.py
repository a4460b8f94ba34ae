"""``python -m maskops.check``: :func:`run` prints the table and returns the report;
:func:`main` is the command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch

import maskops

from .arch import cuda_device_problem
from .bench import bench
from .checks import GROUPS, Checker, select_groups
from .devices import device_label, resolve_devices
from .machine import cpu_summary
from .report import COLUMNS, Report, Result, first_line, format_bench, format_row


def _header_lines(info: dict, devices: List[str], mode: str, seed: int) -> List[str]:
    arch = info.get("cuda_arch_list") or (
        "-" if not info.get("with_cuda") else "visible GPUs at build time"
    )
    lines = [
        f"maskops {info.get('version', maskops.__version__)} self-check ({mode}, seed {seed}), "
        f"imported from {os.path.dirname(os.path.abspath(maskops.__file__))}",
        f"build: torch {info.get('torch')}, CUDA {info.get('cuda') or '-'}, arch list {arch}, "
        f"CUDA kernels {'yes' if info.get('has_cuda_kernels') else 'no'}",
        f"runtime: torch {info.get('runtime_torch')} (CUDA {info.get('runtime_cuda') or '-'}), "
        f"python {platform.python_version()}",
        f"cpu: {cpu_summary()}",
    ]
    for g in info.get("gpus", []):
        lines.append(f"gpu: cuda:{g['index']} {g['name']}, compute capability {g['capability']}")
    lines.append("devices checked: " + (", ".join(devices) if devices else "none"))
    return lines


def run(
    quick: bool = False,
    devices: Optional[str] = None,
    ops: Optional[Sequence[str]] = None,
    bench_speed: bool = False,
    seed: Optional[int] = None,
    json_path: Optional[str] = None,
    out=None,
) -> Report:
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
    groups = select_groups(ops)
    names, problems = resolve_devices(devices)
    info = maskops.build_info()
    mode = "quick" if quick else "full"
    report = Report(
        ok=True,
        mode=mode,
        seed=seed,
        devices=[],
        build_info=info,
        location=os.path.dirname(os.path.abspath(maskops.__file__)),
    )

    def emit(row: Result) -> None:
        print(format_row(row), file=out, flush=True)

    for line in _header_lines(info, names, mode, seed):
        print(line, file=out)
    print(file=out)
    print(" ".join(name.ljust(w) for name, w in COLUMNS).rstrip(), file=out)
    print("-" * (sum(w for _, w in COLUMNS) + len(COLUMNS) - 1), file=out, flush=True)
    for row in problems:
        report.results.append(row)
        emit(row)
    for name in names:
        if name.startswith("cuda"):
            index = int(name.split(":")[1])
            problem = cuda_device_problem(index, info)
            row = Result(
                "CUDA kernels", name, "-", "run on this GPU", problem is None, detail=problem or ""
            )
            report.results.append(row)
            emit(row)
            if problem:
                continue
        report.devices.append(device_label(name))
        checker = Checker(
            torch.device(name), full=not quick, gen=torch.Generator().manual_seed(seed), emit=emit
        )
        for group in groups:
            getattr(checker, GROUPS[group][0])()
        report.results += checker.results
        if bench_speed:
            try:
                report.bench += bench(name, torch.Generator().manual_seed(seed))
            except Exception as e:  # noqa: BLE001 - a benchmark problem is reported, not fatal
                report.results.append(
                    Result("benchmark", name, "-", "runs", False, detail=first_line(e))
                )
                emit(report.results[-1])
    report.ok = all(r.ok for r in report.results) and bool(report.results)
    report.seconds = round(time.perf_counter() - t_start, 2)
    if report.bench:
        print(file=out)
        print(format_bench(report.bench), file=out)
    print(file=out)
    n = len(report.results)
    if report.ok:
        print(
            f"OK: all {n} checks passed on {', '.join(d.split(' ')[0] for d in report.devices)} "
            f"in {report.seconds:.1f} s",
            file=out,
            flush=True,
        )
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m maskops.check",
        description="Check that maskops' compiled kernels give right answers on this machine.",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (seconds)")
    p.add_argument(
        "--device",
        default="all",
        help="all (default: the CPU and every visible GPU), cpu, cuda (every GPU), cuda:N; "
        "comma-separated",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (no PATH: to stdout, the table to stderr)",
    )
    p.add_argument(
        "--bench", action="store_true", help="add a short speed table against torchvision"
    )
    p.add_argument(
        "--ops", default="", help=f"only these (comma-separated): {', '.join(GROUPS)} or op names"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the random inputs (default: fresh)"
    )
    args = p.parse_args(argv)
    try:
        report = run(
            quick=args.quick,
            devices=args.device,
            ops=args.ops.split(",") if args.ops else None,
            bench_speed=args.bench,
            seed=args.seed,
            json_path=args.json,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1
