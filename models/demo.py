"""The end-to-end demo: data, training, evaluation, a prediction and the pipeline trace.

    python -m models.demo [--out demo_out] [--epochs N] [--quick]

1. writes the synthetic shapes dataset (COCO format) to ``OUT/shapes``;
2. trains a small Mask R-CNN (ResNet-18-FPN, 128 px images) on the CPU from scratch,
   printing the per-epoch table ``epoch | loss | box AP | mask AP | AP50 (mask) | time``;
3. evaluates the best checkpoint on the validation split (COCO box and mask AP, per class);
4. draws the detections on a validation image (``OUT/prediction.png``);
5. prints the six-stage pipeline trace (time and output of each stage) for that image.

``--quick`` runs a much shorter version (a smoke test of the whole chain, meaningless AP).
"""
from __future__ import annotations

import os
import sys

# libgomp's default busy-waiting makes every torch thread spin while it waits for the
# others; on a small machine shared with other work that costs up to 10x. Passive waiting
# has to be chosen before the OpenMP runtime loads, hence the re-exec.
if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "models.demo", *sys.argv[1:]])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import torch  # noqa: E402

from .build import ModelConfig, build_model  # noqa: E402
from .checkpoint import load_checkpoint  # noqa: E402
from .data import CocoDataset, collate  # noqa: E402
from .data.shapes import generate  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .train import ShardSampler, TrainConfig, train  # noqa: E402

# The demo's data: 128 px images with 1-3 shapes of three classes.
DATA = dict(train=1000, val=100, size=128, seed=0, min_shapes=1, max_shapes=3)


def demo_config(data: str, out: str, epochs: int = 5) -> TrainConfig:
    """The demo's recipe: a ResNet-18-FPN Mask R-CNN slimmed for 128 px images and two CPU
    cores (narrow pyramid and heads, fewer sampled anchors, proposals and RoIs, anchors
    halved), GroupNorm, trained from scratch with SGD and a cosine schedule."""
    model = ModelConfig(
        backbone="resnet18", num_classes=4, norm="gn", trainable_layers=5, fpn_channels=64,
        representation_size=256, mask_head_channels=64, mask_head_convs=2,
        anchor_sizes=(16, 32, 64, 128, 256), min_size=128, max_size=128,
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128)
    return TrainConfig(
        data=data, out=out, model=model, epochs=epochs, batch_size=8, lr=0.02,
        schedule="cosine", warmup_iters=100, clip_grad=10.0, flip_prob=0.5, seed=0,
        threads=min(2, os.cpu_count() or 1), device="cpu")


def trace_image(model, image: torch.Tensor, names: List[str], out_png: Path) -> str:
    """Draws the detections on ``image`` (``out_png``) and returns the pipeline trace table."""
    from .trace import format_table, trace_rows
    from .visualize import draw_detections, save_image
    model.eval()
    with torch.inference_mode():
        model([image])  # warm-up, so that the trace times a steady-state forward
        with model.record_stages(keep_outputs=True) as rec:
            det = model([image])[0]
    # Drawn on a 4x enlargement: labels are unreadable on a 128 px image.
    k = 4
    big = {"boxes": det["boxes"] * k, "labels": det["labels"], "scores": det["scores"],
           "masks": det["masks"].repeat_interleave(k, -1).repeat_interleave(k, -2)}
    image_big = image.repeat_interleave(k, -1).repeat_interleave(k, -2)
    save_image(draw_detections(image_big, big, score_thresh=0.5, names=names), str(out_png))
    lines = [f"{names[int(l)]} {float(s):.2f}" for l, s in zip(det["labels"], det["scores"])
             if s >= 0.5]
    table = format_table(trace_rows(rec, rec.outputs["input"], [det]))
    return f"detections (score >= 0.5): {', '.join(lines) or 'none'}\n\n{table}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    a = p.parse_args(argv)
    out = Path(a.out)
    data_cfg = dict(DATA)
    if a.quick:
        data_cfg.update(train=64, val=16)
    start = time.perf_counter()

    print(f"[1/5] shapes dataset: {data_cfg['train']} train + {data_cfg['val']} val images of "
          f"{data_cfg['size']} px -> {out / 'shapes'}", flush=True)
    generate(out / "shapes", data_cfg["train"], data_cfg["val"], data_cfg["size"],
             data_cfg["seed"], data_cfg["min_shapes"], data_cfg["max_shapes"])

    cfg = demo_config(str(out / "shapes"), str(out / "run"),
                      a.epochs or (2 if a.quick else demo_config("", "").epochs))
    if a.quick:
        cfg = dataclasses.replace(cfg, iters_per_epoch=4, warmup_iters=4)
    print(f"\n[2/5] training ({cfg.epochs} epochs, CPU, {cfg.threads} threads)", flush=True)
    t_train = time.perf_counter()
    result = train(cfg)

    print("\n[3/5] evaluation of the best checkpoint on the validation split", flush=True)
    state = load_checkpoint(out / "run" / "best.pt")
    model = build_model(ModelConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    val = CocoDataset(out / "shapes", "val")
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate,
                                         sampler=ShardSampler(len(val), 0, 1))
    ev = evaluate(model, loader, torch.device("cpu"))
    train_eval_s = time.perf_counter() - t_train
    print(ev.summary)
    print("\nper-class AP (percent)\n" + ev.per_class_table())
    print(f"\nbest epoch {state['epoch']}: box AP {100 * ev.get('bbox'):.1f}, mask AP "
          f"{100 * ev.get('segm'):.1f}, mask AP50 {100 * ev.get('segm', 'AP50'):.1f}")

    print("\n[4/5] prediction on a validation image", flush=True)
    # The first validation image with several shapes makes the more telling picture.
    index = next((i for i in range(len(val)) if len(val.coco.imgToAnns.get(val.ids[i], [])) >= 3),
                 0)
    image, target = val[index]
    truth = ", ".join(state["class_names"][int(l)] for l in target["labels"])
    report = trace_image(model, image, state["class_names"], out / "prediction.png")
    print(f"wrote {out / 'prediction.png'} (input {val.image_path(index)}; ground truth: "
          f"{truth})")

    print("\n[5/5] pipeline trace of that image\n" + report)
    print(f"\ntraining + evaluation: {train_eval_s / 60:.1f} min; whole demo "
          f"{(time.perf_counter() - start) / 60:.1f} min; loss per epoch "
          + " > ".join(f"{r['loss']:.3f}" for r in result.history)
          + f"; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
