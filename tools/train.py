"""Trains a Mask R-CNN on a COCO-format dataset.

    python -m tools.train --data DIR --out RUN [options]
    torchrun --nproc-per-node 4 -m tools.train --data DIR --out RUN [options]   # DDP

Each epoch shows a progress bar (loss, learning rate, images/s), then evaluates box and mask
AP on the validation split and prints one row of the table ``epoch | loss | box AP | mask AP
| AP50 (mask) | time``; the whole table is printed again at the end. The output folder gets
``metrics.csv``, ``metrics.png`` (loss and AP per epoch), ``config.json``, ``last.pt`` (every
epoch) and ``best.pt`` (best mask AP). See models/README_TRAINING.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from models.config import ModelConfig
from models.data import DatasetError, dataset_num_classes
from models.engine import distributed as dist_utils
from models.engine import loop
from models.engine.checkpoint import CheckpointError
from models.engine.config import TrainConfig
from models.engine.loop import NonFiniteLoss, TrainResult
from models.engine.signals import TrainingInterrupted

from ._console import ConsoleReport
from ._options import add_config_options, config_from_options

# Training from scratch by default: trainable batch norms, every ResNet part trained.
MODEL_DEFAULTS = {"norm": "bn", "trainable_layers": 5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.train", description="Train Mask R-CNN on a COCO-format dataset."
    )
    add_config_options(p, TrainConfig, groups=True)
    # num_classes comes from the dataset.
    add_config_options(
        p, ModelConfig, defaults=MODEL_DEFAULTS, exclude=("num_classes",), group="model"
    )
    return p


def train(cfg: TrainConfig) -> TrainResult:
    """:func:`models.engine.loop.train` with its table and progress printed."""
    return loop.train(cfg, ConsoleReport(bars=cfg.progress))


def config_from_args(a: argparse.Namespace, num_classes: int) -> TrainConfig:
    model = config_from_options(ModelConfig, a, num_classes=num_classes)
    return config_from_options(TrainConfig, a, model=model)


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a, dataset_num_classes(a.data, a.train_split, a.labels))
    try:
        train(cfg)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except (CheckpointError, DatasetError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
