"""Command-line options shared by ``models.predict`` and ``models.trace``."""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from .backbone import RESNETS
from .mask_rcnn import MaskRCNN, build_mask_rcnn


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="state_dict file (this model's or torchvision's maskrcnn_resnet50_fpn); "
                        "without it the weights are random (a warning is printed)")
    p.add_argument("--backbone", default="resnet50", choices=RESNETS)
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--bn-eps", type=float, default=0.0,
                   help="backbone batch-norm epsilon (0.0: what torchvision's COCO checkpoint "
                        "was trained with)")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="autocast convolutions and linear layers to half precision")
    p.add_argument("--no-optimize", action="store_true",
                   help="skip optimize_for_inference() (batch-norm folding, fusion, channels-last)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def load_model(a: argparse.Namespace, box_score_thresh: float = 0.05) -> MaskRCNN:
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.weights is None:
        print("warning: no --weights given: random weights, so the detections are "
              "meaningless (a demo of the pipeline)", file=sys.stderr)
        torch.manual_seed(a.seed)
    model = build_mask_rcnn(a.backbone, a.num_classes, bn_eps=a.bn_eps, weights=a.weights,
                            min_size=a.min_size, max_size=a.max_size,
                            box_score_thresh=box_score_thresh)
    model.eval().to(a.device)
    if not a.no_optimize:
        model.optimize_for_inference()
    return model


def autocast(a: argparse.Namespace):
    if a.amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if a.amp == "bf16" else torch.float16
    return torch.autocast(torch.device(a.device).type, dtype=dtype)
