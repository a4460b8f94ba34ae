"""Self-test of an installed maskops: ``python -m maskops.check`` (or ``maskops.check.run()``).

Runs every op on every device present (the CPU and each visible GPU) on fresh random inputs
of several shapes and dtypes and compares the results with

* a float64 reference in plain PyTorch (:mod:`.references`), independent of the kernels (bilinear
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

The package, one module per concern: ``report`` (rows, the report, its text),
``tolerances``, ``arch`` (GPU architectures), ``references`` (the float64 references),
``inputs`` (random inputs away from decision boundaries), ``checks`` (the per-op checks),
``devices``, ``timing`` and ``machine`` (the timing loop and machine record the benchmarks
share), ``bench`` (``--bench``'s table) and ``cli`` (:func:`run`, :func:`main`). The tests
compare against the same references and draw from the same inputs.
"""

from __future__ import annotations

from .arch import arch_mismatch_message, arch_runs_on, cuda_device_problem, parse_arch_list
from .bench import bench
from .checks import GROUPS, Checker
from .cli import main, run
from .report import Report, Result, format_bench, format_row

__all__ = [
    "run",
    "main",
    "Report",
    "Result",
    "GROUPS",
    "Checker",
    "bench",
    "format_row",
    "format_bench",
    "arch_runs_on",
    "parse_arch_list",
    "arch_mismatch_message",
    "cuda_device_problem",
]
