"""Command-line options shared by ``models.predict`` and ``models.trace``."""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from maskops import cpu

from .backbone import RESNETS
from .coco import COCO_CATEGORIES
from .mask_rcnn import MaskRCNN, build_mask_rcnn


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", default=None,
                     help="state_dict file (this model's or torchvision's maskrcnn_resnet50_fpn); "
                          "without it (or --checkpoint) the weights are random (a warning is "
                          "printed)")
    src.add_argument("--checkpoint", default=None,
                     help="a checkpoint of models.train (last.pt / best.pt): the model is rebuilt "
                          "from the configuration saved in it and detections are named with "
                          "its dataset's class names; --backbone, --num-classes and --bn-eps "
                          "are then ignored")
    p.add_argument("--backbone", default="resnet50", choices=RESNETS)
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--bn-eps", type=float, default=0.0,
                   help="backbone batch-norm epsilon (0.0: what torchvision's COCO checkpoint "
                        "was trained with)")
    p.add_argument("--min-size", type=int, default=None,
                   help="resize the shorter side to this (default 800, or the checkpoint's)")
    p.add_argument("--max-size", type=int, default=None,
                   help="cap the longer side at this (default 1333, or the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="run convolutions and linear layers in half precision: weights "
                        "converted by optimize_for_inference(dtype=...), or autocast with "
                        "--no-optimize; boxes and scores stay float32. auto: bf16 where it is "
                        "faster than float32 on this machine (a warning says when the type "
                        "asked for is slower)")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the modules as built: no optimize_for_inference() and no fast "
                        "inference (batch-norm folding, fusion, channels-last)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def load_model(a: argparse.Namespace, box_score_thresh: float = 0.05) -> MaskRCNN:
    """The model the options describe, in eval mode on ``a.device``. Its ``class_names``
    attribute names the labels (COCO's, or those saved in a ``--checkpoint``);
    ``label_to_category_id`` maps labels to dataset category ids (a ``--checkpoint``'s
    mapping, or None: the labels are COCO category ids already)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "checkpoint", None):
        model, names, mapping = _from_checkpoint(a, box_score_thresh)
    else:
        if a.weights is None:
            print("warning: no --weights given: random weights, so the detections are "
                  "meaningless (a demo of the pipeline)", file=sys.stderr)
            torch.manual_seed(a.seed)
        model = build_mask_rcnn(a.backbone, a.num_classes, bn_eps=a.bn_eps, weights=a.weights,
                                min_size=a.min_size or 800, max_size=a.max_size or 1333,
                                box_score_thresh=box_score_thresh)
        names = mapping = None
    model.class_names = names if names is not None else list(COCO_CATEGORIES)
    model.label_to_category_id = list(mapping) if mapping is not None else None
    model.eval().to(a.device)
    if a.no_optimize:
        model.fast_inference = False
    else:
        model.optimize_for_inference(dtype=_half(a))
    return model


def _from_checkpoint(a: argparse.Namespace, box_score_thresh: float):
    """``(model, class names or None, label -> category id list or None)`` rebuilt from a
    models.train checkpoint."""
    from .build import model_from_checkpoint

    model, state = model_from_checkpoint(a.checkpoint, min_size=a.min_size,
                                         max_size=a.max_size, box_score_thresh=box_score_thresh)
    return model, state.get("class_names"), state.get("label_to_category_id")


def _half(a: argparse.Namespace):
    """The half type ``--amp`` asks for (None: float32)."""
    dtype = cpu.resolve_dtype(a.amp, a.device)
    return None if dtype == torch.float32 else dtype


def autocast(a: argparse.Namespace):
    """Autocast for ``--amp`` with ``--no-optimize`` (an optimised model holds half weights)."""
    dtype = _half(a)
    if dtype is None or not a.no_optimize:
        return contextlib.nullcontext()
    cpu.warn_if_slow(dtype, a.device)
    return torch.autocast(torch.device(a.device).type, dtype=dtype)
