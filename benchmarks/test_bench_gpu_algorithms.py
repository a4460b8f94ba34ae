"""The GPU algorithms' work entry (bench_gpu_algorithms) runs, in quick mode, and reports its
three ratios against their goals."""

from benchmarks import bench_gpu_algorithms as bench


def test_quick_run_reports_the_ratios():
    rows = bench.run("cpu", quick=True)
    assert len(rows) == 3
    assert all(r.maskops.median_ms > 0 and r.torchvision.median_ms > 0 for r in rows)
    assert "gather/scatter" in rows[0].note and "goal <= 3x" in rows[0].note
    assert "batch 2/batch 1" in rows[1].note
    assert "tiles/CPU kernel" in rows[2].note and "goal <= 20x" in rows[2].note
    assert bench.run("cuda", quick=True) == []  # the twins are CPU ops: nothing to add on a GPU
