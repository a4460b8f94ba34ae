"""The console side of the library's reports: lines to stdout / stderr, progress bars with
tqdm on stderr."""

from __future__ import annotations

import sys

from models.engine.report import Progress, Report


class _Bar(Progress):
    def __init__(self, bar) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()


class ConsoleReport(Report):
    """Prints what the library reports; ``bars=False``: no progress bars."""

    def __init__(self, bars: bool = True) -> None:
        self.bars = bars
        self._open = None  # the bar lines are written around

    def line(self, msg: str, err: bool = False) -> None:
        out = sys.stderr if err else sys.stdout
        if self._open is not None:
            self._open.write(msg, file=out)
        else:
            print(msg, file=out)
        out.flush()

    def progress(self, total: int, desc: str, unit: str = "it") -> Progress:
        if not self.bars:
            return Progress()
        from tqdm import tqdm

        bar = tqdm(
            total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr
        )
        self._open = bar
        report = self

        class Bar(_Bar):
            def close(self) -> None:
                super().close()
                report._open = None

        return Bar(bar)
