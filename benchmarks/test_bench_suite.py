"""The suite's entry points run (once, with small sizes) so they cannot rot: every module's
run() with quick sizes, which includes each benchmark's correctness guard."""

import importlib

import pytest
import torch

from benchmarks.__main__ import SUITE


@pytest.mark.parametrize("name,module", SUITE)
def test_quick_run(name, module):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} not present yet")
    rows = mod.run("cpu", quick=True)
    assert rows and all(r.maskops.median_ms > 0 and r.torchvision.median_ms > 0 for r in rows)


def test_under_load_quick_run():
    """bench_under_load (not in the suite: it starts a busy process) runs, stops its busy
    process, and reports both libraries quiet and busy."""
    import subprocess

    from benchmarks import bench_under_load

    started = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        p = real_popen(*args, **kwargs)
        started.append(p)
        return p

    threads = torch.get_num_threads()
    bench_under_load.subprocess.Popen = spy
    try:
        r = bench_under_load.run(quick=True, reps=2)
    finally:
        bench_under_load.subprocess.Popen = real_popen
    assert [row["op"] for row in r["rows"]][0].startswith("MultiScaleRoIAlign")
    for row in r["rows"]:
        assert all(t > 0 for t in row["quiet_ms"] + row["busy_ms"])
    assert started and all(p.poll() is not None for p in started)  # no spinner left behind
    assert "slow-down" in bench_under_load.report(r)
    assert torch.get_num_threads() == threads  # the one-thread reference puts it back
    if threads > 1:
        assert any(row["op"].startswith("reference: torch.mm") for row in r["rows"])


@pytest.mark.cpu_kinds
def test_model_bf16_row_only_where_bfloat16_is_faster():
    from benchmarks.bench_model import bf16_plan
    from maskops import cpu

    with cpu.pretend(native_bf16=False):
        timed, why = bf16_plan("cpu")
        assert not timed and "no native bfloat16" in why and "slower than float32" in why
        timed, why = bf16_plan("cpu", True)  # asked for: timed, and said to be slower
        assert timed and "slower than float32" in why
        assert bf16_plan("cuda") == (True, "measured")
    with cpu.pretend(native_bf16=True, avx512_bf16=True):
        assert bf16_plan("cpu") == (True, "measured")
    with cpu.pretend(native_bf16=True, avx512_bf16=False, amx=False):
        timed, why = bf16_plan("cpu")
        assert not timed and "dot-product units" in why
    assert bf16_plan("cpu", False) == (False, "not asked for")


def test_memory_bench_measures_each_model_in_its_own_process():
    from benchmarks import bench_memory

    r = bench_memory.measure(
        size=64, runs=1, threads=1, variants=(bench_memory.OURS, bench_memory.TORCHVISION)
    )
    assert list(r["results"]) == [bench_memory.OURS, bench_memory.TORCHVISION]
    for v in r["results"].values():
        assert v["peak_rss_mb"] >= v["peak_rss_before_inference_mb"] > 0
    assert "vs torchvision" in bench_memory.report(r)
