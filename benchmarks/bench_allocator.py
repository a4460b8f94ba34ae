"""maskops' CPU buffer cache against what torch and the system allocators already offer.

Each configuration runs in its own process (an allocator is chosen at process start) on the
same inputs, and times:

- the Mask R-CNN of ``models/`` as ``build_mask_rcnn("resnet50")`` gives it (R50-FPN, one
  800x800 image, ``eval()`` under ``torch.inference_mode()``): median of ``--reps`` calls
  after two warm-up calls, minor page faults per call, and the process's peak RSS;
- the two ops whose outputs are large: the paste of 100 masks into a full 1000x1000 image
  (bool, 100 MB) and RoIAlign of 1,000 RoIs to 256 x 7 x 7 (float32, 50 MB), each output
  freed before the next call (as a loop over images does).

Configurations: maskops' cache with torch's allocations routed through it during the model's
forward (as built), the cache without routing (``MASKOPS_CPU_CACHE_TORCH=0``), no cache at
all (also ``MASKOPS_CPU_CACHE_MB=0``), and, with no maskops cache, torch's huge-page
allocation (``THP_MEM_ALLOC_ENABLE=1``), jemalloc and tcmalloc preloaded
(``LD_PRELOAD``; a configuration whose library is missing is skipped)::

    python -m benchmarks.bench_allocator              # writes results/allocator_cpu_<cpu>.md
    python -m benchmarks.bench_allocator --quick      # smoke run: 320x320, 2 reps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
NO_ROUTE = {"MASKOPS_CPU_CACHE_TORCH": "0"}
NO_CACHE = {"MASKOPS_CPU_CACHE_TORCH": "0", "MASKOPS_CPU_CACHE_MB": "0"}

# (name, environment, library that must exist)
CONFIGS = [
    ("maskops cache, routed in the forward (as built)", {}, None),
    ("maskops cache for the ops only (MASKOPS_CPU_CACHE_TORCH=0)", NO_ROUTE, None),
    ("no cache (also MASKOPS_CPU_CACHE_MB=0)", NO_CACHE, None),
    ("no cache, THP_MEM_ALLOC_ENABLE=1", {**NO_CACHE, "THP_MEM_ALLOC_ENABLE": "1"}, None),
    ("no cache, jemalloc", {**NO_CACHE, "LD_PRELOAD": JEMALLOC}, JEMALLOC),
    ("no cache, tcmalloc", {**NO_CACHE, "LD_PRELOAD": TCMALLOC}, TCMALLOC),
    ("maskops cache for the ops only, jemalloc", {**NO_ROUTE, "LD_PRELOAD": JEMALLOC}, JEMALLOC),
]


def _usage() -> tuple:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_minflt, u.ru_utime + u.ru_stime, u.ru_stime


def _timed(fn, reps: int, warmup: int) -> dict:
    """Median ms and interquartile range of fn(), and per call: minor page faults and the
    process's CPU time (all threads, user + system, and system alone: page faults are
    system time). On a shared machine the CPU time is the steadier measure of the work."""
    from benchmarks.common import measure

    for _ in range(warmup):
        fn()
    f0, c0, s0 = _usage()
    t = measure(fn, reps=reps, warmup=0)
    f1, c1, s1 = _usage()
    return {
        "ms": t.median_ms,
        "iqr_ms": t.iqr_ms,
        "faults": (f1 - f0) / reps,
        "cpu_ms": (c1 - c0) * 1e3 / reps,
        "sys_ms": (s1 - s0) * 1e3 / reps,
    }


def worker(size: int, reps: int, op_reps: int) -> dict:
    """The measurements of one configuration, in this process."""
    import torch

    import maskops
    from models import build_mask_rcnn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    result = {}

    # The ops first, before the model has mapped anything.
    masks = torch.rand(100, 1, 28, 28, generator=g)
    xy = torch.rand(100, 2, generator=g) * 700
    boxes = torch.cat([xy, xy + 50 + torch.rand(100, 2, generator=g) * 250], dim=1)
    result["paste 100 masks -> 1000x1000 bool"] = _timed(
        lambda: maskops.paste_masks(masks, boxes, (1000, 1000)), op_reps, 2
    )
    x = torch.randn(1, 256, 200, 200, generator=g)
    xy = torch.rand(1000, 2, generator=g) * 700
    rois = torch.cat(
        [torch.zeros(1000, 1), xy, xy + 16 + torch.rand(1000, 2, generator=g) * 80], dim=1
    )
    with torch.inference_mode():
        result["roi_align 1000 RoIs -> 256x7x7"] = _timed(
            lambda: maskops.roi_align(x, rois, 7, 0.25, 2, True), op_reps, 2
        )

    model = build_mask_rcnn("resnet50").eval()
    image = torch.rand(3, size, size, generator=g)
    with torch.inference_mode():
        model_t = _timed(lambda: model([image]), reps, 2)
    model_t["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result[f"Mask R-CNN R50-FPN {size}x{size}"] = model_t
    result["cache"] = maskops.cpu_cache_info()
    return result


def run(size: int, reps: int, op_reps: int) -> tuple[list, dict]:
    from benchmarks.common import machine

    rows = []
    for name, env, lib in CONFIGS:
        if lib is not None and not os.path.exists(lib):
            print(f"-- {name}: skipped ({lib} missing)", flush=True)
            continue
        print(f"-- {name}", flush=True)
        start = time.perf_counter()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_allocator",
                "--worker",
                "--size",
                str(size),
                "--reps",
                str(reps),
                "--op-reps",
                str(op_reps),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=1800,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
        rows.append(
            {
                "config": name,
                "env": env,
                "results": json.loads(r.stdout.strip().splitlines()[-1]),
                "wall_s": time.perf_counter() - start,
            }
        )
    return rows, machine()


def report(rows: list, mach: dict, size: int, reps: int, op_reps: int) -> str:
    model_key = f"Mask R-CNN R50-FPN {size}x{size}"
    keys = [model_key, "paste 100 masks -> 1000x1000 bool", "roi_align 1000 RoIs -> 256x7x7"]
    base = rows[0]["results"]
    lines = [
        f"Machine: {mach['cpu']}, {mach['cpu_threads']} threads, torch {mach['torch']}, "
        f"maskops kernels at {mach['maskops_isa']}",
        f"Each configuration in its own process; model: median of {reps} calls after 2 "
        f"warm-up calls; ops: median of {op_reps} calls, output freed each time. "
        "Per call: wall ms, median (IQR); CPU ms of the process, all threads, user + system "
        "(system alone); minor page faults. Ratio: CPU ms / the first row's.",
        "",
    ]
    for k in keys:
        lines += [
            f"**{k}**",
            "",
            "| configuration | wall ms (IQR) | CPU ms (system) | CPU ratio | faults |"
            + (" peak RSS MB |" if k == model_key else ""),
            "|---|---|---|---|---|" + ("---|" if k == model_key else ""),
        ]
        for row in rows:
            t = row["results"][k]
            cells = [
                row["config"],
                f"{t['ms']:.1f} ({t['iqr_ms']:.1f})",
                f"{t['cpu_ms']:.0f} ({t['sys_ms']:.0f})",
                f"{t['cpu_ms'] / base[k]['cpu_ms']:.2f}",
                f"{t['faults']:.0f}",
            ]
            if k == model_key:
                cells.append(f"{t['peak_rss_mb']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--op-reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="smoke run: 320x320, 2 reps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.reps, a.op_reps = 320, 2, 3
    if a.worker:
        print(json.dumps(worker(a.size, a.reps, a.op_reps)))
        return
    rows, mach = run(a.size, a.reps, a.op_reps)
    text = report(rows, mach, a.size, a.reps, a.op_reps)
    print(text)
    if a.quick:
        return
    slug = "".join(c if c.isalnum() else "-" for c in mach["cpu"].lower()).strip("-")
    path = os.path.join(a.out, f"allocator_cpu_{slug}")
    with open(path + ".md", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump(
            {"machine": mach, "size": a.size, "reps": a.reps, "op_reps": a.op_reps, "rows": rows},
            f,
            indent=1,
        )
    print(f"written to {path}.md", flush=True)


if __name__ == "__main__":
    main()
