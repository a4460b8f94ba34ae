"""COCO box and mask AP of a checkpoint on a COCO-format split.

    python -m tools.evaluate --data DIR --split val --checkpoint RUN/best.pt
    python -m tools.evaluate --data COCO --split val2017 --weights maskrcnn_resnet50_fpn.pth

``--checkpoint`` takes a checkpoint of ``tools.train`` (the model is rebuilt from the config
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

from models.config import ModelConfig
from models.data import DatasetError
from models.engine import distributed as dist_utils
from models.engine.checkpoint import CheckpointError
from models.evaluation.run import evaluate_split, load_for_eval

from ._console import ConsoleReport
from ._options import add_config_options, config_from_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.evaluate", description="COCO bbox and segm AP of a Mask R-CNN."
    )
    p.add_argument("--data", required=True, help="COCO-format dataset folder")
    p.add_argument("--split", default="val")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint of tools.train")
    src.add_argument("--weights", help="a state_dict (this model's or torchvision's layout)")
    p.add_argument(
        "--labels",
        choices=("contiguous", "category_id"),
        default=None,
        help="--weights: label mode (default category_id)",
    )
    # --weights: the model; num_classes 0: the dataset's. min/max size None: the
    # checkpoint's, or the defaults.
    add_config_options(
        p,
        ModelConfig,
        ("backbone", "bn_eps", "num_classes", "min_size", "max_size"),
        defaults={"bn_eps": 0.0, "num_classes": 0, "min_size": None, "max_size": None},
    )
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument(
        "--amp",
        default="none",
        choices=("none", "auto", "bf16", "fp16"),
        help="autocast; auto: bf16 where it is faster than float32 here",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        device = dist_utils.init(a.device)
        if a.threads:
            torch.set_num_threads(a.threads)
        model, labels = load_for_eval(
            a.data,
            a.split,
            checkpoint=a.checkpoint,
            weights=a.weights,
            labels=a.labels,
            config=config_from_options(ModelConfig, a),
            overrides={"min_size": a.min_size, "max_size": a.max_size},
        )
        result = evaluate_split(
            model,
            a.data,
            a.split,
            labels,
            device=device,
            max_images=a.max_images,
            batch_size=a.batch_size,
            workers=a.workers,
            amp=a.amp,
            report=ConsoleReport(),
        )
        if dist_utils.is_main_process():
            print(
                f"{result.num_images} images, {result.num_detections} detections, "
                f"{result.seconds:.1f} s"
            )
            print(result.summary)
            print("\nper-class AP (percent)\n" + result.per_class_table())
            print(
                f"\nbox AP {100 * result.get('bbox'):.1f}  mask AP "
                f"{100 * result.get('segm'):.1f}  mask AP50 "
                f"{100 * result.get('segm', 'AP50'):.1f}"
            )
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"stats": result.stats, "per_class": result.per_class}, f, indent=2)
    except (CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
