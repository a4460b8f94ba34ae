"""Accuracy of bfloat16 inference: held-out COCO box and mask AP of a trained model with
bfloat16 weights (``optimize_for_inference(dtype=torch.bfloat16)``) against the same model in
float32, which must agree within ``--bound`` (0.01 AP).

    python -m benchmarks.bench_bf16_accuracy [--demo-out demo_out] [--json PATH]

The model is `make demo`'s (ResNet-18-FPN on the synthetic shapes data): its best checkpoint
and validation split are read from ``--demo-out`` when present; otherwise the demo's data and
training are run there first (about 5 minutes on 2 cores). Random weights would say nothing
here: AP needs a model that detects something. Exits 1 when either AP moves by more than the
bound, so no bfloat16 speed is quoted for a model it would make worse.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.common import machine


def trained_model(out: Path):
    """The demo's best checkpoint under ``out``, trained first if missing."""
    from models.build import ModelConfig, build_model
    from models.data.shapes import generate
    from models.engine import train
    from models.engine.checkpoint import load_checkpoint
    from models.engine.demo import DEMO_DATA as DATA
    from models.engine.demo import demo_config

    best = out / "run" / "best.pt"
    if not best.exists():
        print(f"no checkpoint at {best}: running the demo's data and training", flush=True)
        generate(
            out / "shapes",
            DATA["train"],
            DATA["val"],
            DATA["size"],
            DATA["seed"],
            DATA["min_shapes"],
            DATA["max_shapes"],
        )
        train(demo_config(str(out / "shapes"), str(out / "run")))
    state = load_checkpoint(best)
    model = build_model(ModelConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv=None) -> int:
    from models.data import CocoDataset, collate
    from models.engine import ShardSampler
    from models.evaluation import evaluate

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--demo-out", default="demo_out")
    p.add_argument("--bound", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.demo_out)
    model = trained_model(out)
    val = CocoDataset(out / "shapes", "val")
    loader = torch.utils.data.DataLoader(
        val, batch_size=8, collate_fn=collate, sampler=ShardSampler(len(val), 0, 1)
    )
    results = {}
    for name in ("float32", "bfloat16"):
        m = (
            model
            if name == "float32"
            else copy.deepcopy(model).optimize_for_inference(dtype=torch.bfloat16)
        )
        assert next(m.backbone.parameters()).dtype == getattr(torch, name)
        ev = evaluate(m, loader, torch.device("cpu"))
        results[name] = {
            "box AP": ev.get("bbox"),
            "mask AP": ev.get("segm"),
            "mask AP50": ev.get("segm", "AP50"),
            "seconds": ev.seconds,
        }
    diff = {
        k: results["bfloat16"][k] - results["float32"][k]
        for k in ("box AP", "mask AP", "mask AP50")
    }
    ok = all(abs(diff[k]) <= a.bound for k in ("box AP", "mask AP"))
    print(f"{machine()['cpu']}, {len(val)} held-out images")
    print("| weights | box AP | mask AP | mask AP50 | eval s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['box AP']:.4f} | {r['mask AP']:.4f} | {r['mask AP50']:.4f} | "
            f"{r['seconds']:.1f} |"
        )
    print(
        f"| bfloat16 - float32 | {diff['box AP']:+.4f} | {diff['mask AP']:+.4f} | "
        f"{diff['mask AP50']:+.4f} | |"
    )
    print(f"{'within' if ok else 'NOT within'} {a.bound} AP (box and mask)")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "images": len(val),
                    "results": results,
                    "difference": diff,
                    "bound": a.bound,
                    "within": ok,
                },
                f,
                indent=2,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
