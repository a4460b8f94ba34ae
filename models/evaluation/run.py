"""COCO box and mask AP of a saved model (a training checkpoint or a bare state_dict) on a
COCO-format split; sharded across ranks under ``torchrun``."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from ..build import build_model, model_from_checkpoint
from ..config import ModelConfig
from ..data import CocoDataset, DatasetError, collate
from ..engine import distributed as dist_utils
from ..engine.amp import autocast_dtype
from ..engine.checkpoint import CheckpointError
from ..engine.loaders import ShardSampler
from ..engine.report import Report
from .coco_eval import EvalResult, evaluate


def load_for_eval(
    data: str,
    split: str,
    *,
    checkpoint: Optional[str] = None,
    weights: Optional[str] = None,
    config: Optional[ModelConfig] = None,
    overrides: Optional[Dict[str, Any]] = None,
    labels: Optional[str] = None,
) -> Tuple[torch.nn.Module, str]:
    """``(model, label mode)``: a training ``checkpoint`` rebuilt from its saved config (with
    the ``overrides`` fields that are not None replaced), or ``config`` with the state_dict
    file ``weights`` (this model's or torchvision's layout; labels ``category_id`` unless
    given; num_classes the dataset's where ``config.num_classes`` is 0).
    """
    if checkpoint:
        model, state = model_from_checkpoint(checkpoint, **(overrides or {}))
        return model, state["config"].get("labels", "contiguous")
    config = config or ModelConfig()
    labels = labels or "category_id"
    if not config.num_classes:
        ds_classes = CocoDataset(data, split, labels=labels).num_classes
        config = dataclasses.replace(config, num_classes=ds_classes)
    model = build_model(config)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"weights file {weights} cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model.load_state_dict(state)
    return model, labels


def evaluate_split(
    model: torch.nn.Module,
    data: str,
    split: str,
    labels: str,
    *,
    device: torch.device,
    max_images: int = 0,
    batch_size: int = 2,
    workers: int = 0,
    amp: str = "none",
    report: Optional[Report] = None,
) -> EvalResult:
    """Box and mask AP of ``model`` on a split (this rank's shard of it under torchrun; every
    rank returns the whole result).

    Raises:
        DatasetError: the model predicts another number of classes than the split has.
    """
    model.to(device).eval()
    ds = CocoDataset(data, split, labels=labels)
    predicted = model.roi_heads.box_predictor.cls_score.out_features
    if predicted != ds.num_classes:
        raise DatasetError(
            f"the model predicts {predicted} classes but {ds.annotation_file} "
            f"has {ds.num_classes} with labels={labels!r} (use --labels "
            "category_id for COCO-trained models)"
        )
    if max_images:
        ds.ids = ds.ids[:max_images]
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=workers,
        sampler=ShardSampler(len(ds), dist_utils.rank(), dist_utils.world_size()),
    )
    return evaluate(
        model,
        loader,
        device,
        autocast_dtype(amp, device),
        report=report if dist_utils.is_main_process() else None,
    )
