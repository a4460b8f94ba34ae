"""COCO box and mask AP of a checkpoint on a COCO-format split.

    python -m models.evaluate --data DIR --split val --checkpoint RUN/best.pt
    python -m models.evaluate --data COCO --split val2017 --weights maskrcnn_resnet50_fpn.pth

``--checkpoint`` takes a checkpoint of ``models.train`` (the model is rebuilt from the config
stored in it). ``--weights`` takes a bare state_dict in this model's or torchvision's layout,
e.g. torchvision's ``maskrcnn_resnet50_fpn`` COCO weights; the model is then built from the
command line options (``--backbone``, ``--bn-eps``...) and the labels are the dataset's
category ids (91 classes on COCO). Under ``torchrun`` each rank scores a shard and rank 0
prints the result.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from . import distributed as dist_utils
from .build import ModelConfig, build_model, model_from_checkpoint
from .checkpoint import CheckpointError
from .data import CocoDataset, DatasetError, collate
from .evaluation import EvalResult, evaluate
from .train import ShardSampler, autocast_dtype


def load_for_eval(args) -> tuple:
    """``(model, labels mode)`` from ``--checkpoint`` or ``--weights``."""
    if args.checkpoint:
        model, state = model_from_checkpoint(args.checkpoint, min_size=args.min_size,
                                             max_size=args.max_size)
        return model, state["config"].get("labels", "contiguous")
    labels = args.labels or "category_id"
    ds_classes = CocoDataset(args.data, args.split, labels=labels).num_classes
    mcfg = ModelConfig(backbone=args.backbone, num_classes=args.num_classes or ds_classes,
                       norm="frozen_bn", bn_eps=args.bn_eps,
                       min_size=args.min_size or 800, max_size=args.max_size or 1333)
    model = build_model(mcfg)
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"weights file {args.weights} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model.load_state_dict(state)
    return model, labels


def run(args) -> Optional[EvalResult]:
    device = dist_utils.init(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, labels = load_for_eval(args)
    model.to(device).eval()
    ds = CocoDataset(args.data, args.split, labels=labels)
    if model.roi_heads.box_predictor.cls_score.out_features != ds.num_classes:
        raise DatasetError(f"the model predicts {model.roi_heads.box_predictor.cls_score.out_features}"
                           f" classes but {ds.annotation_file} has {ds.num_classes} with "
                           f"labels={labels!r} (use --labels category_id for COCO-trained models)")
    if args.max_images:
        ds.ids = ds.ids[:args.max_images]
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers,
        sampler=ShardSampler(len(ds), dist_utils.rank(), dist_utils.world_size()))
    result = evaluate(model, loader, device, autocast_dtype(args.amp, device),
                      progress=dist_utils.is_main_process())
    if dist_utils.is_main_process():
        print(f"{result.num_images} images, {result.num_detections} detections, "
              f"{result.seconds:.1f} s")
        print(result.summary)
        print("\nper-class AP (percent)\n" + result.per_class_table())
        print(f"\nbox AP {100 * result.get('bbox'):.1f}  mask AP {100 * result.get('segm'):.1f}"
              f"  mask AP50 {100 * result.get('segm', 'AP50'):.1f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"stats": result.stats, "per_class": result.per_class}, f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.evaluate",
                                description="COCO bbox and segm AP of a Mask R-CNN.")
    p.add_argument("--data", required=True, help="COCO-format dataset folder")
    p.add_argument("--split", default="val")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint of models.train")
    src.add_argument("--weights", help="a state_dict (this model's or torchvision's layout)")
    p.add_argument("--backbone", default="resnet50", help="--weights: the backbone")
    p.add_argument("--bn-eps", type=float, default=0.0,
                   help="--weights: batch-norm epsilon (torchvision's COCO weights: 0.0)")
    p.add_argument("--labels", choices=("contiguous", "category_id"), default=None,
                   help="--weights: label mode (default category_id)")
    p.add_argument("--num-classes", type=int, default=0, help="--weights: override")
    p.add_argument("--min-size", type=int, default=None)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--amp", default="none", choices=("none", "auto", "bf16", "fp16"),
                   help="autocast; auto: bf16 where it is faster than float32 here")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
