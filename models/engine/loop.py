"""The training loop: optimiser, schedule, one step, the epochs with evaluation and
checkpoints.

Each epoch reports a progress bar (loss, learning rate, images/s), then evaluates box and mask
AP on the validation split and reports one row of the table ``epoch | loss | box AP | mask AP
| AP50 (mask) | time``; the whole table again at the end. The output folder gets
``metrics.csv``, ``metrics.png`` (loss and AP per epoch), ``config.json``, ``last.pt`` (every
epoch) and ``best.pt`` (best mask AP). See models/README_TRAINING.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..build import build_model, count_parameters
from ..config import ModelConfig
from ..evaluation import EvalResult, evaluate, nan_to_zero
from . import distributed as dist_utils
from .amp import autocast_dtype
from .checkpoint import (
    CheckpointError,
    link_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .config import TrainConfig, config_differences
from .loaders import make_loaders, to_device
from .metrics import TABLE_HEADER, table, table_row, write_metrics
from .report import SILENT, Report
from .rng import rng_states, seed_everything, set_rng_states
from .schedule import WarmupSchedule, build_scheduler
from .signals import StopRequest, TrainingInterrupted

__all__ = [
    "train",
    "train_step",
    "TrainResult",
    "NonFiniteLoss",
    "make_optimizer",
    "make_schedule",
    "CheckpointError",
]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"--optimizer must be sgd or adamw, got {cfg.optimizer!r}")


def make_schedule(cfg: TrainConfig, iters_per_epoch: int) -> WarmupSchedule:
    return WarmupSchedule(
        cfg.epochs * iters_per_epoch,
        cfg.warmup_iters,
        cfg.warmup_factor,
        cfg.schedule,
        [e * iters_per_epoch for e in cfg.lr_steps],
        cfg.lr_gamma,
        cfg.min_lr_factor,
    )


class NonFiniteLoss(FloatingPointError):
    pass


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Tuple[list, list]],
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    scaler=None,
    clip_grad: float = 0.0,
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
        ctx = (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        )
        sync = (
            model.no_sync()
            if isinstance(model, nn.parallel.DistributedDataParallel) and k < n - 1
            else contextlib.nullcontext()
        )
        with sync:
            with ctx:
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                bad = {k2: float(v) for k2, v in losses.items()}
                raise NonFiniteLoss(
                    f"non-finite loss {bad}; lower --lr, raise --warmup-iters or set --clip-grad"
                )
            (scaler.scale(loss / n) if scaler is not None else loss / n).backward()
        for name, v in losses.items():
            totals[name] = totals.get(name, 0.0) + float(v.detach()) / n
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / n
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return totals


@dataclass
class TrainResult:
    history: List[Dict[str, Any]]
    best_mask_ap: float
    out: Path
    model: nn.Module
    eval_result: Optional[EvalResult] = None


def train(cfg: TrainConfig, report: Report = SILENT) -> TrainResult:
    """Runs training as ``cfg`` says (see the module docstring); returns the history and the
    trained model (unwrapped from DDP). The main process tells ``report`` the table's rows
    and, with ``cfg.progress``, each epoch's progress.

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
    say = report.line if main else (lambda msg: None)
    amp_dtype = autocast_dtype(cfg.amp, device)

    resume_state = None
    if cfg.resume:
        path = Path(cfg.resume if cfg.resume != "auto" else out / "last.pt")
        resume_state = load_checkpoint(
            path, required=("model", "optimizer", "scheduler", "epoch", "config", "rng")
        )
        saved = dict(resume_state["config"])
        # Model options added since the checkpoint was written had their defaults then.
        saved["model"] = {**ModelConfig().to_dict(), **saved.get("model", {})}
        diffs = config_differences(saved, cfg.to_dict())
        if diffs:
            raise CheckpointError(
                f"--resume {path} refused: the config differs from the "
                "checkpoint's in " + "; ".join(diffs)
            )

    seed_everything(cfg.seed)
    train_loader, val_loader = make_loaders(cfg, rank, world)
    train_ds = train_loader.dataset
    if cfg.model.num_classes != train_ds.num_classes:
        raise ValueError(
            f"the model has num_classes={cfg.model.num_classes} but the dataset "
            f"has {train_ds.num_classes} labels (background included) with "
            f"labels={cfg.labels!r}"
        )
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
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        say(
            f"{cfg.model.backbone}-FPN Mask R-CNN, {count_parameters(model) / 1e6:.1f} M "
            f"parameters, {len(train_ds)} training images, {iters} iterations/epoch x "
            f"{cfg.batch_size} images x {world} process(es), on {device}"
            + (f", resumed from epoch {start_epoch - 1}" if resume_state else "")
        )
        say(table(history) if history else TABLE_HEADER)

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
                bar = report.progress(iters, f"epoch {epoch}/{cfg.epochs}")
            for it, (images, targets) in enumerate(train_loader):
                if it >= iters:
                    break
                losses = train_step(
                    ddp, optimizer, [(images, targets)], device, amp_dtype, scaler, cfg.clip_grad
                )
                scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += 1
                if bar is not None:
                    rate = seen * cfg.batch_size * world / (time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{losses['loss']:.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.1f}",
                    )
                    bar.update()
                if stop.requested():
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(stop.signal or signal.SIGTERM, last_ckpt)
            if bar is not None:
                bar.close()
            train_time = time.perf_counter() - t0
            means = dist_utils.all_reduce_mean(
                torch.tensor(
                    [sums[k] / max(1, seen) for k in sorted(sums)],
                    dtype=torch.float64,
                    device=device if device.type == "cuda" else "cpu",
                )
            )
            means = dict(zip(sorted(sums), means.tolist()))

            ev = evaluate(model, val_loader, device, amp_dtype)
            result_eval = ev
            row = {
                "epoch": epoch,
                "loss": means["loss"],
                **{k: means[k] for k in sorted(means) if k != "loss"},
                "lr": optimizer.param_groups[0]["lr"],
                "box_AP": nan_to_zero(ev.get("bbox", "AP")),
                "box_AP50": nan_to_zero(ev.get("bbox", "AP50")),
                "mask_AP": nan_to_zero(ev.get("segm", "AP")),
                "mask_AP50": nan_to_zero(ev.get("segm", "AP50")),
                "train_time": train_time,
                "eval_time": ev.seconds,
                "epoch_time": time.perf_counter() - t0,
                "images_per_s": seen * cfg.batch_size * world / max(train_time, 1e-9),
            }
            history.append(row)
            improved = row["mask_AP"] > best
            best = max(best, row["mask_AP"])
            if main:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": epoch,
                    "rng": rng_states(),
                    "config": cfg.to_dict(),
                    "history": history,
                    "best_mask_ap": best,
                    "class_names": train_ds.class_names,
                    "label_to_category_id": train_ds.label_to_category_id,
                }
                save_checkpoint(state, out / "last.pt")
                if improved:
                    link_checkpoint(out / "last.pt", out / "best.pt")
                write_metrics(out, history)
                say(table_row(row))
            last_ckpt = out / "last.pt"
            dist_utils.barrier()
            epochs_run += 1
            if stop.requested():
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, last_ckpt)
            if cfg.stop_after and epochs_run >= cfg.stop_after:
                break

    if main and history:
        say("\n" + table(history))
        if result_eval is not None:
            say("\nper-class AP (last epoch, percent)\n" + result_eval.per_class_table())
        say(f"\nbest mask AP {100 * best:.1f}; checkpoints, metrics.csv and metrics.png in {out}")
    return TrainResult(history, best, out, model, result_eval)
