"""bench_allocator's report from made-up rows (a real run takes one process per allocator)."""

from benchmarks import bench_allocator


def test_report_names_every_configuration_and_measure():
    keys = [
        "Mask R-CNN R50-FPN 64x64",
        "paste 100 masks -> 1000x1000 bool",
        "roi_align 1000 RoIs -> 256x7x7",
    ]
    rows = []
    for i, (name, env, _) in enumerate(bench_allocator.CONFIGS):
        t = {
            "ms": 10.0 + i,
            "iqr_ms": 1.0,
            "faults": 5.0 * i,
            "cpu_ms": 20.0 + i,
            "sys_ms": float(i),
            "peak_rss_mb": 1000.0,
        }
        rows.append({"config": name, "env": env, "results": {k: dict(t) for k in keys}})
    mach = {"cpu": "Some CPU", "cpu_threads": 2, "torch": "2", "maskops_isa": "avx2"}
    text = bench_allocator.report(rows, mach, 64, 2, 3)
    for name, _, _ in bench_allocator.CONFIGS:
        assert text.count(name) == 3
    assert "Some CPU" in text and "| 1.00 |" in text and "peak RSS MB" in text
