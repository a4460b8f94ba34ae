"""benchmarks/gpu_check.sh rehearsed without a GPU, with one step made to fail: the later steps
still run, the summary lists every step and comes last, the exit code says a step failed, and
what lands in $OUT fits what a lent GPU machine returns (8 files, 2 folders deep)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["build", "cuda-tests", "bench", "memcheck", "racecheck", "op-tests"]


def summary_rows(text):
    """{step: (status, log)} from the summary's markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[4])
    return rows


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)
def test_rehearsal_with_a_failing_step(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECK_DEVICE="cpu",
        GPU_CHECK_SKIP_BUILD="1",
        GPU_CHECK_STEPS=",".join(STEPS),  # the whole plan but maskops.check
        GPU_CHECK_FAIL_STEP="cuda-tests",  # an early step fails ...
        GPU_CHECK_TESTS="tests/test_nms.py::test_box_area",  # ... the tiniest test subset
        GPU_CHECK_BENCH_ONLY="nms",
    )
    env.pop("GPU_CHECK_BUDGETS", None)
    env.pop("GPU_CHECK_PLAN", None)
    res = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    log = res.stdout + res.stderr
    assert res.returncode == 1, log

    summary = (out / "summary.md").read_text()
    rows = summary_rows(summary)
    assert list(rows) == STEPS, summary
    assert rows["cuda-tests"][0] == "FAILED (3)"
    assert rows["build"][0].startswith("skipped (GPU_CHECK_SKIP_BUILD")
    assert rows["memcheck"][0] == rows["racecheck"][0] == "skipped (no GPU)"
    # The steps after the failing one ran and passed, and wrote their logs and tables.
    assert rows["bench"] == ("ok", "bench.log") and rows["op-tests"] == ("ok", "tests.log"), summary
    assert "4 passed" in (out / "tests.log").read_text()
    assert list((out / "results").glob("*-quick.json")) and list(
        (out / "results").glob("*-quick.md")
    )
    # The summary is the last thing printed.
    assert res.stdout.rstrip().endswith(summary.rstrip()), res.stdout[-2000:]
    assert "exit code 1" in summary

    # What a lent GPU machine returns: at most 8 files, at most 2 folders deep, plain names.
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for f in files:
        assert len(f.parts) <= 3, f
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts), f


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)
def test_a_hanging_step_is_stopped_at_its_budget(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECK_DEVICE="cpu",
        GPU_CHECK_STEPS="cuda-tests,memcheck",
        GPU_CHECK_FAIL_STEP="cuda-tests:hang",
        GPU_CHECK_BUDGETS="cuda-tests=6",
    )
    res = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1, res.stdout + res.stderr
    rows = summary_rows((out / "summary.md").read_text())
    assert list(rows) == ["cuda-tests", "memcheck"], rows
    assert rows["cuda-tests"][0].startswith("FAILED (124, timed out"), rows
    assert rows["memcheck"][0] == "skipped (no GPU)"
