"""The suite's entry points run (once, with small sizes) so they cannot rot: every module's
run() with quick sizes, which includes each benchmark's correctness guard."""
import importlib

import pytest

from benchmarks.__main__ import SUITE


@pytest.mark.parametrize("name,module", SUITE)
def test_quick_run(name, module):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} not present yet")
    rows = mod.run("cpu", quick=True)
    assert rows and all(r.maskops.median_ms > 0 and r.torchvision.median_ms > 0 for r in rows)
