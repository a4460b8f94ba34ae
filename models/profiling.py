"""Per-stage wall-clock timing of a forward pass."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional

import torch


class StageRecorder:
    """Collects the time spent in each named stage of a forward, and optionally what each
    stage produced (for the pipeline trace).

    A stage entered several times (e.g. RoI Align for boxes, then for masks) accumulates.
    On CUDA the device is synchronised at each stage boundary so that times are the
    stage's, not the launch's.

    Attributes:
        times: ``{stage: seconds}`` in the order stages were first entered.
        outputs: ``{name: value}`` kept with :meth:`keep` when ``keep_outputs`` is set.
    """

    def __init__(self, keep_outputs: bool = False, device: Optional[torch.device] = None) -> None:
        self.keep_outputs = keep_outputs
        self.device = torch.device(device) if device is not None else None
        self.times: Dict[str, float] = {}
        self.outputs: Dict[str, Any] = {}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def keep(self, name: str, value: Any) -> None:
        if self.keep_outputs:
            self.outputs[name] = value

    def total(self) -> float:
        return sum(self.times.values())

    def __repr__(self) -> str:
        times = ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in self.times.items())
        return f"{self.__class__.__name__}({times})"


def stage(recorder: Optional[StageRecorder], name: str):
    """``recorder.stage(name)``, or a no-op context when not recording."""
    return recorder.stage(name) if recorder is not None else contextlib.nullcontext()


def keep(recorder: Optional[StageRecorder], name: str, value: Any) -> None:
    if recorder is not None:
        recorder.keep(name, value)
