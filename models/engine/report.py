"""Where the library's progress and messages go. The library never prints: a long run (training,
evaluation, prediction over many files, the demo) takes a :class:`Report` and tells it what
happened; the default one is silent. The command-line tools pass one that prints
(``tools/_console.py``)."""

from __future__ import annotations


class Progress:
    """A progress bar's handle; this one shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


class Report:
    """Silent: subclass it to show what the library reports."""

    def line(self, msg: str, err: bool = False) -> None:
        """A finished line of output (``err``: a warning or error, for stderr)."""

    def progress(self, total: int, desc: str, unit: str = "it") -> Progress:
        """A progress bar over ``total`` steps (closed by the caller)."""
        return Progress()


SILENT = Report()
