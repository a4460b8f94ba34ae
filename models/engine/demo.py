"""The end-to-end demo: data, training, evaluation, a prediction and the pipeline trace
(the demo tool: ``python -m tools.demo``).

1. writes the synthetic shapes dataset (COCO format) to ``OUT/shapes``;
2. trains a small Mask R-CNN (ResNet-18-FPN, 128 px images) on the CPU from scratch,
   reporting the per-epoch table ``epoch | loss | box AP | mask AP | AP50 (mask) | time``;
3. evaluates the best checkpoint on the validation split (COCO box and mask AP, per class);
4. draws the detections on a validation image (``OUT/prediction.png``);
5. reports the six-stage pipeline trace (time and output of each stage) for that image.

``quick`` runs a much shorter version (a smoke test of the whole chain, meaningless AP).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..build import build_model
from ..config import ModelConfig
from ..data import CocoDataset, collate
from ..data.shapes import generate
from ..evaluation import evaluate
from ..profiling import format_table, trace_rows
from ..visualize import draw_detections, save_image
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .loaders import ShardSampler
from .loop import train
from .report import SILENT, Report

# The demo's data: 128 px images with 1-3 shapes of three classes.
DEMO_DATA = dict(train=1000, val=100, size=128, seed=0, min_shapes=1, max_shapes=3)


def demo_config(data: str, out: str, epochs: int = 5) -> TrainConfig:
    """The demo's recipe: a ResNet-18-FPN Mask R-CNN slimmed for 128 px images and two CPU
    cores (narrow pyramid and heads, fewer sampled anchors, proposals and RoIs, anchors
    halved), GroupNorm, trained from scratch with SGD and a cosine schedule."""
    model = ModelConfig(
        backbone="resnet18",
        num_classes=4,
        norm="gn",
        trainable_layers=5,
        fpn_channels=64,
        representation_size=256,
        mask_head_channels=64,
        mask_head_convs=2,
        anchor_sizes=(16, 32, 64, 128, 256),
        min_size=128,
        max_size=128,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=128,
    )
    return TrainConfig(
        data=data,
        out=out,
        model=model,
        epochs=epochs,
        batch_size=8,
        lr=0.02,
        schedule="cosine",
        warmup_iters=100,
        clip_grad=10.0,
        flip_prob=0.5,
        seed=0,
        threads=min(2, os.cpu_count() or 1),
        device="cpu",
    )


def trace_image(model, image: torch.Tensor, names: List[str], out_png: Path) -> str:
    """Draws the detections on ``image`` (``out_png``) and returns the pipeline trace table."""
    model.eval()
    with torch.inference_mode():
        model([image])  # warm-up, so that the trace times a steady-state forward
        with model.record_stages(keep_outputs=True) as rec:
            det = model([image])[0]
    # Drawn on a 4x enlargement: labels are unreadable on a 128 px image.
    k = 4
    big = {
        "boxes": det["boxes"] * k,
        "labels": det["labels"],
        "scores": det["scores"],
        "masks": det["masks"].repeat_interleave(k, -1).repeat_interleave(k, -2),
    }
    image_big = image.repeat_interleave(k, -1).repeat_interleave(k, -2)
    save_image(draw_detections(image_big, big, score_thresh=0.5, names=names), str(out_png))
    lines = [
        f"{names[int(l)]} {float(s):.2f}" for l, s in zip(det["labels"], det["scores"]) if s >= 0.5
    ]
    table = format_table(trace_rows(rec, rec.outputs["input"], [det]))
    return f"detections (score >= 0.5): {', '.join(lines) or 'none'}\n\n{table}"


def run_demo(
    out, epochs: Optional[int] = None, quick: bool = False, report: Report = SILENT
) -> None:
    """Runs the five steps of the module docstring into the folder ``out``."""
    say = report.line
    out = Path(out)
    data_cfg = dict(DEMO_DATA)
    if quick:
        data_cfg.update(train=64, val=16)
    start = time.perf_counter()

    say(
        f"[1/5] shapes dataset: {data_cfg['train']} train + {data_cfg['val']} val images of "
        f"{data_cfg['size']} px -> {out / 'shapes'}"
    )
    generate(
        out / "shapes",
        data_cfg["train"],
        data_cfg["val"],
        data_cfg["size"],
        data_cfg["seed"],
        data_cfg["min_shapes"],
        data_cfg["max_shapes"],
    )

    cfg = demo_config(
        str(out / "shapes"),
        str(out / "run"),
        epochs or (2 if quick else demo_config("", "").epochs),
    )
    if quick:
        cfg = dataclasses.replace(cfg, iters_per_epoch=4, warmup_iters=4)
    say(f"\n[2/5] training ({cfg.epochs} epochs, CPU, {cfg.threads} threads)")
    t_train = time.perf_counter()
    result = train(cfg, report)

    say("\n[3/5] evaluation of the best checkpoint on the validation split")
    state = load_checkpoint(out / "run" / "best.pt")
    model = build_model(ModelConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    val = CocoDataset(out / "shapes", "val")
    loader = torch.utils.data.DataLoader(
        val, batch_size=8, collate_fn=collate, sampler=ShardSampler(len(val), 0, 1)
    )
    ev = evaluate(model, loader, torch.device("cpu"))
    train_eval_s = time.perf_counter() - t_train
    say(ev.summary)
    say("\nper-class AP (percent)\n" + ev.per_class_table())
    say(
        f"\nbest epoch {state['epoch']}: box AP {100 * ev.get('bbox'):.1f}, mask AP "
        f"{100 * ev.get('segm'):.1f}, mask AP50 {100 * ev.get('segm', 'AP50'):.1f}"
    )

    say("\n[4/5] prediction on a validation image")
    # The first validation image with several shapes makes the more telling picture.
    index = next(
        (i for i in range(len(val)) if len(val.coco.imgToAnns.get(val.ids[i], [])) >= 3), 0
    )
    image, target = val[index]
    truth = ", ".join(state["class_names"][int(l)] for l in target["labels"])
    trace_text = trace_image(model, image, state["class_names"], out / "prediction.png")
    say(f"wrote {out / 'prediction.png'} (input {val.image_path(index)}; ground truth: {truth})")

    say("\n[5/5] pipeline trace of that image\n" + trace_text)
    say(
        f"\ntraining + evaluation: {train_eval_s / 60:.1f} min; whole demo "
        f"{(time.perf_counter() - start) / 60:.1f} min; loss per epoch "
        + " > ".join(f"{r['loss']:.3f}" for r in result.history)
        + f"; outputs in {out}"
    )
