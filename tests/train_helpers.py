"""Shared pieces of the data, training, evaluation and DDP tests: a small shapes dataset and
a tiny, fast model configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.build import ModelConfig
from models.data.shapes import generate
from models.engine import TrainConfig

SIZE = 64


def make_shapes(
    folder: Path, train: int = 8, val: int = 4, size: int = SIZE, seed: int = 0, **kw
) -> Path:
    generate(folder, train, val, size=size, seed=seed, **kw)
    return folder


def tiny_model(**overrides) -> ModelConfig:
    """A Mask R-CNN small enough for a test step in about 0.1 s on 64 px images."""
    cfg = ModelConfig(
        backbone="resnet18",
        num_classes=4,
        norm="gn",
        trainable_layers=5,
        fpn_channels=32,
        representation_size=64,
        mask_head_channels=32,
        mask_head_convs=1,
        anchor_sizes=(8, 16, 32, 64, 128),
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
        box_detections_per_img=20,
    )
    return dataclasses.replace(cfg, **overrides)


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    model = overrides.pop("model", None) or tiny_model()
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        model=model,
        epochs=2,
        batch_size=2,
        iters_per_epoch=2,
        lr=0.01,
        schedule="cosine",
        warmup_iters=2,
        clip_grad=10.0,
        threads=1,
        progress=False,
        seed=0,
    )
    return dataclasses.replace(cfg, **overrides)
