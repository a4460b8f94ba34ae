"""The training run's configuration: one dataclass (the model's own nested in it), the only
place each option is named; the training tool generates its options from the fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from ..config import ModelConfig, from_dict, option, to_dict

# Options that may change between a run and its --resume: where things go and how they are
# shown, not what is computed.
RESUME_MUTABLE = ("out", "resume", "workers", "progress", "stop_after", "threads")


@dataclass
class TrainConfig:
    """Everything a training run depends on (``model`` holds the model's structure)."""

    data: str = option("", "COCO-format dataset folder", group="data and output", required=True)
    out: str = option("runs/maskrcnn", "output folder", group="data and output")
    train_split: str = option("train", group="data and output")
    val_split: str = option("val", group="data and output")
    labels: str = option(
        "contiguous",
        "contiguous: category ids -> 1..K; category_id: keep "
        "the ids (COCO: 91 classes, torchvision's layout)",
        choices=("contiguous", "category_id"),
        group="data and output",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = option(12, group="optimisation")
    batch_size: int = option(2, "images per process", group="optimisation")
    iters_per_epoch: int = option(0, "cap (0: the whole split)", group="optimisation")
    val_max_images: int = option(0, "evaluate on the first N only", group="data and output")
    optimizer: str = option("sgd", choices=("sgd", "adamw"), group="optimisation")
    lr: float = option(0.02, group="optimisation")
    momentum: float = option(0.9, group="optimisation")
    weight_decay: float = option(1e-4, group="optimisation")
    schedule: str = option("step", choices=("step", "cosine", "constant"), group="optimisation")
    lr_steps: Tuple[int, ...] = option(
        (8, 11),
        "epochs after which the lr is multiplied by --lr-gamma (step)",
        nargs="*",
        group="optimisation",
    )
    lr_gamma: float = option(0.1, group="optimisation")
    min_lr_factor: float = option(0.0, "cosine: final lr / --lr", group="optimisation")
    warmup_iters: int = option(500, group="optimisation")
    warmup_factor: float = option(0.001, group="optimisation")
    clip_grad: float = option(0.0, "max gradient norm (0: off)", group="optimisation")
    amp: str = option(
        "none",
        "autocast: bf16 (CPU or GPU) or fp16 with a gradient scaler "
        "(GPU); auto: bf16 where it is faster than float32 on this machine",
        choices=("none", "auto", "bf16", "fp16"),
        group="optimisation",
    )
    flip_prob: float = option(0.5, group="optimisation")
    seed: int = option(0, group="optimisation")
    device: str = option("auto", "auto, cpu or cuda", group="running")
    threads: int = option(0, "torch threads per process (0: torch's)", group="running")
    workers: int = option(0, "data loader workers", group="running")
    world_size: int = option(1, cli=False)
    progress: bool = option(True, "progress bar", group="running")
    stop_after: int = option(
        0, "stop after this many epochs of this run (resume later)", group="running"
    )
    resume: str = option(
        "",
        "continue from a checkpoint (no value: OUT/last.pt)",
        nargs="?",
        const="auto",
        group="running",
    )

    def to_dict(self) -> Dict[str, Any]:
        d = to_dict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        d["lr_steps"] = tuple(d.get("lr_steps", ()))
        return from_dict(cls, d)


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``"key: checkpoint X, now Y"`` for each setting that differs (nested keys dotted),
    ignoring :data:`RESUME_MUTABLE`."""
    diffs = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            name = prefix + k
            if not prefix and k in RESUME_MUTABLE:
                continue
            va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, name + ".")
            elif _norm(va) != _norm(vb):
                diffs.append(f"{name}: checkpoint {va!r}, now {vb!r}")

    walk(saved, current, "")
    return diffs


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
