"""Command-line options made from the library's config dataclasses (each option is named once,
as a field, with its help in the field's metadata), and the model options shared by the
inference tools (predict, trace, export)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, Iterable, Optional

import torch

from models.build import load_model as _load_model
from models.config import ModelConfig
from models.engine.amp import half_dtype, inference_autocast


def add_config_options(
    p: argparse.ArgumentParser,
    cls,
    names: Optional[Iterable[str]] = None,
    defaults: Optional[Dict[str, Any]] = None,
    exclude: Iterable[str] = (),
    groups: bool = False,
    group: Optional[str] = None,
) -> None:
    """An option ``--field-name`` (dest ``field_name``) for each field of the dataclass ``cls``
    in ``names`` (default: every field made by :func:`models.config.option` with
    ``metadata["cli"]`` not False, less ``exclude``), with the field's
    type, help, choices and nargs from its metadata and its default (or ``defaults[name]``).
    ``groups``: options in argument groups by ``metadata["group"]`` (else ``group``)."""
    defaults = defaults or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if names is None:
        names = [
            n
            for n, f in fields.items()
            if "help" in f.metadata and f.metadata.get("cli", True) and n not in exclude
        ]
    made = {}
    for name in names:
        f = fields[name]
        meta = f.metadata
        title = meta.get("group") if groups else group
        if title is not None and title not in made:
            made[title] = p.add_argument_group(title)
        target = made[title] if title is not None else p
        default = defaults.get(name, _default(f))
        flags = meta.get("flags", ("--" + name.replace("_", "-"),))
        kw: Dict[str, Any] = {"dest": name, "help": meta.get("help") or None}
        if isinstance(_default(f), bool):
            if default:
                target.add_argument("--no-" + name.replace("_", "-"), action="store_false", **kw)
            else:
                target.add_argument(*flags, action="store_true", **kw)
            continue
        if meta.get("required"):
            kw["required"] = True
        else:
            kw["default"] = list(default) if isinstance(default, tuple) else default
        for key in ("choices", "nargs", "const", "metavar"):
            if key in meta:
                kw[key] = meta[key]
        sample = _default(f)
        if isinstance(sample, tuple):
            sample = sample[0] if sample else 0
        if isinstance(sample, (int, float)) and not isinstance(sample, bool):
            kw["type"] = type(sample)
        target.add_argument(*flags, **kw)


def config_from_options(cls, a: argparse.Namespace, **fields: Any):
    """``cls`` from the options :func:`add_config_options` made (those left None keep the
    field's default), with ``fields`` given directly."""
    kw = {}
    for f in dataclasses.fields(cls):
        value = getattr(a, f.name, None)
        if value is not None and f.name not in fields:
            kw[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kw, **fields)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


# ---- the inference tools' model options ----

CHECKPOINT_OVERRIDES = ("min_size", "max_size")


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--weights",
        default=None,
        help="state_dict file (this model's or torchvision's maskrcnn_resnet50_fpn); "
        "without it (or --checkpoint) the weights are random (a warning is "
        "printed)",
    )
    src.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint of tools.train (last.pt / best.pt): the model is rebuilt "
        "from the configuration saved in it and detections are named with "
        "its dataset's class names; --backbone, --num-classes and --bn-eps "
        "are then ignored",
    )
    # min/max size default to None: the checkpoint's, or the model's default.
    add_config_options(
        p,
        ModelConfig,
        ("backbone", "num_classes", "bn_eps", "min_size", "max_size"),
        defaults={"bn_eps": 0.0, "min_size": None, "max_size": None},
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16"],
        default=None,
        help="run convolutions and linear layers in half precision: weights "
        "converted by optimize_for_inference(dtype=...), or autocast with "
        "--no-optimize; boxes and scores stay float32. auto: bf16 where it is "
        "faster than float32 on this machine (a warning says when the type "
        "asked for is slower)",
    )
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the modules as built: no optimize_for_inference() and no fast "
        "inference (batch-norm folding, fusion, channels-last)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def load_model(a: argparse.Namespace, box_score_thresh: float = 0.05):
    """The model the options of :func:`add_model_args` describe (see
    :func:`models.build.load_model`)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if not getattr(a, "checkpoint", None) and a.weights is None:
        print(
            "warning: no --weights given: random weights, so the detections are "
            "meaningless (a demo of the pipeline)",
            file=sys.stderr,
        )
        torch.manual_seed(a.seed)
    cfg = config_from_options(ModelConfig, a, box_score_thresh=box_score_thresh)
    overrides = {k: getattr(a, k) for k in CHECKPOINT_OVERRIDES}
    return _load_model(
        cfg,
        weights=a.weights,
        checkpoint=getattr(a, "checkpoint", None),
        overrides=dict(overrides, box_score_thresh=box_score_thresh),
        device=a.device,
        dtype=_half(a),
        optimize=not a.no_optimize,
    )


def _half(a: argparse.Namespace):
    """The half type ``--amp`` asks for (None: float32)."""
    return half_dtype(a.amp, a.device)


def autocast(a: argparse.Namespace):
    """Autocast for ``--amp`` with ``--no-optimize`` (an optimised model holds half weights)."""
    return inference_autocast(a.amp, a.device, optimized=not a.no_optimize)
