"""The per-epoch table and the metrics files of a training run."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List

TABLE_HEADER = (
    "| epoch | loss | box AP | mask AP | AP50 (mask) | time |\n|---:|---:|---:|---:|---:|---:|"
)


def table_row(row: Dict[str, Any]) -> str:
    return (
        f"| {row['epoch']} | {row['loss']:.4f} | {100 * row['box_AP']:.1f} | "
        f"{100 * row['mask_AP']:.1f} | {100 * row['mask_AP50']:.1f} | "
        f"{row['epoch_time']:.0f} s |"
    )


def table(history: List[Dict[str, Any]]) -> str:
    return "\n".join([TABLE_HEADER] + [table_row(r) for r in history])


def write_metrics(out: Path, history: List[Dict[str, Any]]) -> None:
    """``metrics.csv`` and ``metrics.png`` (written atomically, like the checkpoints)."""
    if not history:
        return
    keys = list(history[0].keys())
    for r in history[1:]:
        keys += [k for k in r if k not in keys]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    try:
        plot_metrics(history, out / "metrics.png")
    except Exception as e:  # a plot is not worth a failed run
        warnings.warn(f"could not plot metrics: {e}", stacklevel=2)


def plot_metrics(history: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["loss"] for r in history], "o-", label="total")
    for k in ("loss_mask", "loss_classifier", "loss_box_reg", "loss_objectness"):
        if k in history[0]:
            a.plot(epochs, [r[k] for r in history], ".--", label=k[5:], alpha=0.7)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    for k, label in (("box_AP", "box AP"), ("mask_AP", "mask AP"), ("mask_AP50", "mask AP50")):
        b.plot(epochs, [r[k] for r in history], "o-", label=label)
    b.set_xlabel("epoch")
    b.set_ylabel("validation")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".metrics.png.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
