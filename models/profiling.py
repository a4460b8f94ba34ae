"""Per-stage wall-clock timing of a forward pass, and the pipeline trace made from it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, List, Optional, Tuple

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


# ---- the pipeline trace: each stage's output and time ----

LEVEL_NAMES = {"0": "P2", "1": "P3", "2": "P4", "3": "P5", "pool": "P6"}


def _shape(s) -> str:
    return " x ".join(str(int(v)) for v in s)


def trace_rows(rec, batch_shape, detections: List[Dict[str, torch.Tensor]]) -> List[dict]:
    """The table rows from a :class:`StageRecorder` run with ``keep_outputs``."""
    t = {k: v * 1e3 for k, v in rec.times.items()}
    out = rec.outputs
    h = batch_shape[-2]
    # Strides are powers of two; the coarsest map of a size not divisible by 64 rounds up.
    levels = ", ".join(
        f"{LEVEL_NAMES.get(k, k)} {_shape(f.shape)} "
        f"(stride {2 ** round(math.log2(h / f.shape[-2]))})"
        for k, f in out["features"].items()
    )
    proposals, scores = out["proposals"]
    n_prop = " + ".join(str(len(p)) for p in proposals)
    n_det = " + ".join(str(len(d["boxes"])) for d in detections)
    masks = ", ".join(_shape(d["masks"].shape) for d in detections)
    lowres = " + ".join(_shape(m.shape) for m in out["mask_probs"])
    return [
        {
            "stage": "1 Input image",
            "output": _shape(batch_shape),
            "ms": t.get("transform", 0.0),
            "detail": "normalised, resized, padded to /32",
        },
        {"stage": "2 Backbone CNN (ResNet-FPN)", "output": levels, "ms": t.get("backbone", 0.0)},
        {
            "stage": "3 Region Proposal Network",
            "output": f"{n_prop} boxes x 4 + scores",
            "ms": t.get("rpn", 0.0),
        },
        {
            "stage": "4 RoI Align",
            "output": f"{_shape(out['box_roi_features'])} (box) and "
            f"{_shape(out['mask_roi_features'])} (mask)",
            "ms": t.get("roi_align", 0.0),
        },
        {
            "stage": "5 Box & classifier head",
            "output": f"{n_det} boxes with class labels and refined coordinates",
            "ms": t.get("box_head", 0.0),
        },
        {
            "stage": "6 Mask head",
            "output": f"{lowres} masks, pasted to full size: {masks}",
            "ms": t.get("mask_head", 0.0) + t.get("paste", 0.0),
            "detail": f"head {t.get('mask_head', 0.0):.1f} ms + paste {t.get('paste', 0.0):.1f} ms",
        },
    ]


def format_table(rows: List[dict]) -> str:
    w1 = max(len(r["stage"]) for r in rows)
    lines = [f"| {'stage':<{w1}} | output | time |", f"|{'-' * (w1 + 2)}|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']:<{w1}} | {r['output']} | {r['ms']:.1f} ms |")
    total = sum(r["ms"] for r in rows)
    lines.append(f"| {'total':<{w1}} | | {total:.1f} ms |")
    return "\n".join(lines)


def trace(
    model, image: torch.Tensor, warmup: int = 1, autocast=None
) -> Tuple[List[dict], StageRecorder, Dict[str, torch.Tensor]]:
    """``(rows, recorder, detections)`` of one recorded forward of ``model`` on ``image``
    after ``warmup`` untimed ones (under the context manager ``autocast``, if given)."""
    with torch.inference_mode(), autocast or contextlib.nullcontext():
        for _ in range(warmup):
            model([image])
        with model.record_stages(keep_outputs=True) as rec:
            det = model([image])[0]
    return trace_rows(rec, rec.outputs["input"], [det]), rec, det
