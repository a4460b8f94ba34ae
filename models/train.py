"""Trains a Mask R-CNN on a COCO-format dataset.

    python -m models.train --data DIR --out RUN [options]
    torchrun --nproc-per-node 4 -m models.train --data DIR --out RUN [options]   # DDP

Each epoch shows a progress bar (loss, learning rate, images/s), then evaluates box and mask
AP on the validation split and prints one row of the table ``epoch | loss | box AP | mask AP
| AP50 (mask) | time``; the whole table is printed again at the end. The output folder gets
``metrics.csv``, ``metrics.png`` (loss and AP per epoch), ``config.json``, ``last.pt`` (every
epoch) and ``best.pt`` (best mask AP). See models/README_TRAINING.md.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from maskops import cpu

from . import distributed as dist_utils
from .build import ModelConfig, build_model, count_parameters
from .checkpoint import (CheckpointError, link_checkpoint, load_checkpoint,
                         remove_stale_temporaries, save_checkpoint)
from .data import CocoDataset, DatasetError, collate
from .evaluation import EvalResult, evaluate, nan_to_zero
from .schedule import WarmupSchedule, build_scheduler

# Options that may change between a run and its --resume: where things go and how they are
# shown, not what is computed.
RESUME_MUTABLE = ("out", "resume", "workers", "progress", "stop_after", "threads")


@dataclass
class TrainConfig:
    """Everything a training run depends on (``model`` holds the model's structure)."""
    data: str = ""
    out: str = "runs/maskrcnn"
    train_split: str = "train"
    val_split: str = "val"
    labels: str = "contiguous"
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 12
    batch_size: int = 2
    iters_per_epoch: int = 0
    val_max_images: int = 0
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    lr_steps: Tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    min_lr_factor: float = 0.0
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    clip_grad: float = 0.0
    amp: str = "none"
    flip_prob: float = 0.5
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    workers: int = 0
    world_size: int = 1
    progress: bool = True
    stop_after: int = 0
    resume: str = ""

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        d["lr_steps"] = tuple(d.get("lr_steps", ()))
        return cls(**d)


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


# ---- reproducibility ----

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> Dict[str, Any]:
    """Every RNG's state, in a form that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(_to_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- stopping on signals ----

class StopRequest:
    """Turns SIGTERM / SIGINT into a flag that the loop checks between iterations, so that a
    stop never lands inside a checkpoint write; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def requested(self) -> bool:
        """Whether any rank was asked to stop (collective under torch.distributed)."""
        flag = self.signal is not None
        if dist_utils.is_distributed():
            t = torch.tensor([float(flag)], device=_collective_device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TrainingInterrupted(Exception):
    """Training stopped on a signal; the last complete checkpoint is intact."""

    def __init__(self, signum: int, checkpoint: Optional[Path]) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = (f"the last complete checkpoint is {checkpoint}" if checkpoint
                 else "no epoch had completed, so there is no checkpoint")
        super().__init__(f"stopped by {name}; {where}")


# ---- building blocks ----

def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``--amp`` asks for on ``device`` (None: no autocast). ``auto``:
    bfloat16 where it is faster than float32 (:func:`maskops.cpu.inference_dtype`), else none.
    Warns once where the type asked for is slower than float32 on this CPU."""
    if amp not in ("none", "auto", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, auto, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU (use bf16 on the CPU)")
    dtype = cpu.resolve_dtype(amp, device)
    if dtype == torch.float32:
        return None
    cpu.warn_if_slow(dtype, device)
    return dtype


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"--optimizer must be sgd or adamw, got {cfg.optimizer!r}")


def make_schedule(cfg: TrainConfig, iters_per_epoch: int) -> WarmupSchedule:
    return WarmupSchedule(cfg.epochs * iters_per_epoch, cfg.warmup_iters, cfg.warmup_factor,
                          cfg.schedule, [e * iters_per_epoch for e in cfg.lr_steps],
                          cfg.lr_gamma, cfg.min_lr_factor)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


class NonFiniteLoss(FloatingPointError):
    pass


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Tuple[list, list]], device: torch.device,
               amp_dtype: Optional[torch.dtype] = None, scaler=None, clip_grad: float = 0.0
               ) -> Dict[str, float]:
    """One optimiser step on the mean gradient of ``micro_batches``.

    DDP averages the gradients of the ranks' batches, so a single process that passes the
    ranks' batches as micro-batches computes the same update.

    Returns:
        The mean of each loss over the micro-batches, and ``"loss"``, their sum.

    Raises:
        NonFiniteLoss: a loss is NaN or infinite (before the weights change).
    """
    optimizer.zero_grad(set_to_none=True)
    totals: Dict[str, float] = {}
    n = len(micro_batches)
    for k, (images, targets) in enumerate(micro_batches):
        images, targets = to_device(images, targets, device)
        ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype
               else contextlib.nullcontext())
        sync = (model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel)
                and k < n - 1 else contextlib.nullcontext())
        with sync:
            with ctx:
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                bad = {k2: float(v) for k2, v in losses.items()}
                raise NonFiniteLoss(f"non-finite loss {bad}; lower --lr, raise --warmup-iters "
                                    "or set --clip-grad")
            (scaler.scale(loss / n) if scaler is not None else loss / n).backward()
        for name, v in losses.items():
            totals[name] = totals.get(name, 0.0) + float(v.detach()) / n
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / n
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return totals


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...`` in order, without padding (evaluation: every
    image scored exactly once across ranks)."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(cfg: TrainConfig, rank: int, world: int):
    train_ds = CocoDataset(cfg.data, cfg.train_split, labels=cfg.labels, flip_prob=cfg.flip_prob,
                           seed=cfg.seed)
    val_ds = CocoDataset(cfg.data, cfg.val_split, labels=cfg.labels)
    if cfg.val_max_images:
        val_ds.ids = val_ds.ids[:cfg.val_max_images]
    if len(train_ds) < cfg.batch_size * world:
        raise ValueError(f"{len(train_ds)} training images are fewer than one global batch "
                         f"({cfg.batch_size} x {world} processes)")
    # DistributedSampler shuffles with a generator seeded by (seed + epoch): the order
    # depends on the epoch only, so a resumed run sees the same batches.
    train_sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=train_sampler, collate_fn=collate,
        num_workers=cfg.workers, drop_last=True, persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_size=max(1, cfg.batch_size), sampler=ShardSampler(len(val_ds), rank, world),
        collate_fn=collate, num_workers=cfg.workers)
    return train_loader, val_loader


# ---- reporting ----

TABLE_HEADER = ("| epoch | loss | box AP | mask AP | AP50 (mask) | time |\n"
                "|---:|---:|---:|---:|---:|---:|")


def table_row(row: Dict[str, Any]) -> str:
    return (f"| {row['epoch']} | {row['loss']:.4f} | {100 * row['box_AP']:.1f} | "
            f"{100 * row['mask_AP']:.1f} | {100 * row['mask_AP50']:.1f} | "
            f"{row['epoch_time']:.0f} s |")


def table(history: List[Dict[str, Any]]) -> str:
    return "\n".join([TABLE_HEADER] + [table_row(r) for r in history])


def write_metrics(out: Path, history: List[Dict[str, Any]]) -> None:
    """``metrics.csv`` and ``metrics.png`` (written atomically, like the checkpoints)."""
    if not history:
        return
    keys = list(history[0].keys())
    for r in history[1:]:
        keys += [k for k in r if k not in keys]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    try:
        plot_metrics(history, out / "metrics.png")
    except Exception as e:  # a plot is not worth a failed run
        print(f"warning: could not plot metrics: {e}", file=sys.stderr)


def plot_metrics(history: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["loss"] for r in history], "o-", label="total")
    for k in ("loss_mask", "loss_classifier", "loss_box_reg", "loss_objectness"):
        if k in history[0]:
            a.plot(epochs, [r[k] for r in history], ".--", label=k[5:], alpha=0.7)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    for k, label in (("box_AP", "box AP"), ("mask_AP", "mask AP"), ("mask_AP50", "mask AP50")):
        b.plot(epochs, [r[k] for r in history], "o-", label=label)
    b.set_xlabel("epoch")
    b.set_ylabel("validation")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".metrics.png.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _say(msg: str) -> None:
    if dist_utils.is_main_process():
        from tqdm import tqdm
        tqdm.write(msg)
        sys.stdout.flush()


# ---- the run ----

@dataclass
class TrainResult:
    history: List[Dict[str, Any]]
    best_mask_ap: float
    out: Path
    model: nn.Module
    eval_result: Optional[EvalResult] = None


def train(cfg: TrainConfig) -> TrainResult:
    """Runs training as ``cfg`` says (see the module docstring); returns the history and the
    trained model (unwrapped from DDP).

    Raises:
        CheckpointError: ``cfg.resume`` is unreadable or was written with another config.
        TrainingInterrupted: a SIGTERM / SIGINT stopped the run (the last checkpoint is
            intact).
    """
    device = dist_utils.init(cfg.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    cfg = dataclasses.replace(cfg, world_size=world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    main = dist_utils.is_main_process()
    amp_dtype = autocast_dtype(cfg.amp, device)

    resume_state = None
    if cfg.resume:
        path = Path(cfg.resume if cfg.resume != "auto" else out / "last.pt")
        resume_state = load_checkpoint(path, required=("model", "optimizer", "scheduler",
                                                       "epoch", "config", "rng"))
        diffs = config_differences(resume_state["config"], cfg.to_dict())
        if diffs:
            raise CheckpointError(f"--resume {path} refused: the config differs from the "
                                  "checkpoint's in " + "; ".join(diffs))

    seed_everything(cfg.seed)
    train_loader, val_loader = make_loaders(cfg, rank, world)
    train_ds = train_loader.dataset
    if cfg.model.num_classes != train_ds.num_classes:
        raise ValueError(f"the model has num_classes={cfg.model.num_classes} but the dataset "
                         f"has {train_ds.num_classes} labels (background included) with "
                         f"labels={cfg.labels!r}")
    iters = len(train_loader)
    if cfg.iters_per_epoch:
        iters = min(iters, cfg.iters_per_epoch)

    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, make_schedule(cfg, iters))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history: List[Dict[str, Any]] = []
    best = -1.0
    start_epoch = 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        history = list(resume_state.get("history", []))
        best = float(resume_state.get("best_mask_ap", -1.0))
        start_epoch = int(resume_state["epoch"]) + 1
        set_rng_states(resume_state["rng"])
    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        _say(f"{cfg.model.backbone}-FPN Mask R-CNN, {count_parameters(model) / 1e6:.1f} M "
             f"parameters, {len(train_ds)} training images, {iters} iterations/epoch x "
             f"{cfg.batch_size} images x {world} process(es), on {device}"
             + (f", resumed from epoch {start_epoch - 1}" if resume_state else ""))
        _say(table(history) if history else TABLE_HEADER)

    last_ckpt = out / "last.pt" if (out / "last.pt").is_file() else None
    result_eval = None
    epochs_run = 0
    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            train_loader.sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            ddp.train()
            sums: Dict[str, float] = {}
            seen = 0
            t0 = time.perf_counter()
            bar = None
            if main and cfg.progress:
                from tqdm import tqdm
                bar = tqdm(total=iters, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                           dynamic_ncols=True, file=sys.stderr)
            for it, (images, targets) in enumerate(train_loader):
                if it >= iters:
                    break
                losses = train_step(ddp, optimizer, [(images, targets)], device, amp_dtype,
                                    scaler, cfg.clip_grad)
                scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += 1
                if bar is not None:
                    rate = seen * cfg.batch_size * world / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{losses['loss']:.3f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.1f}")
                    bar.update()
                if stop.requested():
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(stop.signal or signal.SIGTERM, last_ckpt)
            if bar is not None:
                bar.close()
            train_time = time.perf_counter() - t0
            means = dist_utils.all_reduce_mean(
                torch.tensor([sums[k] / max(1, seen) for k in sorted(sums)], dtype=torch.float64,
                             device=device if device.type == "cuda" else "cpu"))
            means = dict(zip(sorted(sums), means.tolist()))

            ev = evaluate(model, val_loader, device, amp_dtype)
            result_eval = ev
            row = {"epoch": epoch, "loss": means["loss"],
                   **{k: means[k] for k in sorted(means) if k != "loss"},
                   "lr": optimizer.param_groups[0]["lr"],
                   "box_AP": nan_to_zero(ev.get("bbox", "AP")),
                   "box_AP50": nan_to_zero(ev.get("bbox", "AP50")),
                   "mask_AP": nan_to_zero(ev.get("segm", "AP")),
                   "mask_AP50": nan_to_zero(ev.get("segm", "AP50")),
                   "train_time": train_time, "eval_time": ev.seconds,
                   "epoch_time": time.perf_counter() - t0,
                   "images_per_s": seen * cfg.batch_size * world / max(train_time, 1e-9)}
            history.append(row)
            improved = row["mask_AP"] > best
            best = max(best, row["mask_AP"])
            if main:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else {},
                         "epoch": epoch, "rng": rng_states(), "config": cfg.to_dict(),
                         "history": history, "best_mask_ap": best,
                         "class_names": train_ds.class_names,
                         "label_to_category_id": train_ds.label_to_category_id}
                save_checkpoint(state, out / "last.pt")
                if improved:
                    link_checkpoint(out / "last.pt", out / "best.pt")
                write_metrics(out, history)
                _say(table_row(row))
            last_ckpt = out / "last.pt"
            dist_utils.barrier()
            epochs_run += 1
            if stop.requested():
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, last_ckpt)
            if cfg.stop_after and epochs_run >= cfg.stop_after:
                break

    if main and history:
        _say("\n" + table(history))
        if result_eval is not None:
            _say("\nper-class AP (last epoch, percent)\n" + result_eval.per_class_table())
        _say(f"\nbest mask AP {100 * best:.1f}; checkpoints, metrics.csv and metrics.png in {out}")
    return TrainResult(history, best, out, model, result_eval)


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    m = ModelConfig()
    p = argparse.ArgumentParser(prog="python -m models.train",
                                description="Train Mask R-CNN on a COCO-format dataset.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="COCO-format dataset folder")
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split)
    g.add_argument("--labels", default=d.labels, choices=("contiguous", "category_id"),
                   help="contiguous: category ids -> 1..K; category_id: keep the ids (COCO: 91 "
                        "classes, torchvision's layout)")
    g.add_argument("--out", default=d.out, help="output folder")
    g.add_argument("--val-max-images", type=int, default=0, help="evaluate on the first N only")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet50",
                   choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    g.add_argument("--norm", default="bn", choices=("bn", "gn", "frozen_bn"),
                   help="backbone normalisation (bn/gn: from scratch)")
    g.add_argument("--trainable-layers", type=int, default=5)
    g.add_argument("--fpn-channels", type=int, default=m.fpn_channels)
    g.add_argument("--representation-size", type=int, default=m.representation_size)
    g.add_argument("--mask-head-channels", type=int, default=m.mask_head_channels)
    g.add_argument("--mask-head-convs", type=int, default=m.mask_head_convs)
    g.add_argument("--anchor-sizes", type=int, nargs=5, default=list(m.anchor_sizes))
    g.add_argument("--min-size", type=int, default=m.min_size)
    g.add_argument("--max-size", type=int, default=m.max_size)
    g.add_argument("--rpn-pre-nms-top-n-train", type=int, default=m.rpn_pre_nms_top_n_train)
    g.add_argument("--rpn-post-nms-top-n-train", type=int, default=m.rpn_post_nms_top_n_train)
    g.add_argument("--rpn-pre-nms-top-n-test", type=int, default=m.rpn_pre_nms_top_n_test)
    g.add_argument("--rpn-post-nms-top-n-test", type=int, default=m.rpn_post_nms_top_n_test)
    g.add_argument("--rpn-batch-size-per-image", type=int, default=m.rpn_batch_size_per_image)
    g.add_argument("--box-batch-size-per-image", type=int, default=m.box_batch_size_per_image)
    g.add_argument("--box-detections-per-img", type=int, default=m.box_detections_per_img)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process")
    g.add_argument("--iters-per-epoch", type=int, default=0, help="cap (0: the whole split)")
    g.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "adamw"))
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", default=d.schedule, choices=("step", "cosine", "constant"))
    g.add_argument("--lr-steps", type=int, nargs="*", default=list(d.lr_steps),
                   help="epochs after which the lr is multiplied by --lr-gamma (step)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    g.add_argument("--min-lr-factor", type=float, default=d.min_lr_factor,
                   help="cosine: final lr / --lr")
    g.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    g.add_argument("--warmup-factor", type=float, default=d.warmup_factor)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad,
                   help="max gradient norm (0: off)")
    g.add_argument("--amp", default=d.amp, choices=("none", "auto", "bf16", "fp16"),
                   help="autocast: bf16 (CPU or GPU) or fp16 with a gradient scaler (GPU); "
                        "auto: bf16 where it is faster than float32 on this machine")
    g.add_argument("--flip-prob", type=float, default=d.flip_prob)
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("running")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's)")
    g.add_argument("--workers", type=int, default=d.workers, help="data loader workers")
    g.add_argument("--resume", nargs="?", const="auto", default="",
                   help="continue from a checkpoint (no value: OUT/last.pt)")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs of this run (resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(a: argparse.Namespace, num_classes: int) -> TrainConfig:
    model = ModelConfig(
        backbone=a.backbone, num_classes=num_classes, norm=a.norm,
        trainable_layers=a.trainable_layers, fpn_channels=a.fpn_channels,
        representation_size=a.representation_size, mask_head_channels=a.mask_head_channels,
        mask_head_convs=a.mask_head_convs, anchor_sizes=tuple(a.anchor_sizes),
        min_size=a.min_size, max_size=a.max_size,
        rpn_pre_nms_top_n_train=a.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=a.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=a.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=a.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=a.rpn_batch_size_per_image,
        box_batch_size_per_image=a.box_batch_size_per_image,
        box_detections_per_img=a.box_detections_per_img)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "world_size"}
    kw = {k: getattr(a, k) for k in names if hasattr(a, k)}
    kw["lr_steps"] = tuple(a.lr_steps)
    return TrainConfig(model=model, **kw)


def dataset_num_classes(data: str, split: str, labels: str) -> int:
    """Classes (background included) of a split, from its categories only."""
    from .data.coco import find_split, load_coco_json
    _, ann = find_split(data, split)
    ids = [c["id"] for c in load_coco_json(ann)["categories"]]
    return (len(ids) if labels == "contiguous" else max(ids, default=0)) + 1


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
