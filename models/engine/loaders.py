"""Samplers and data loaders of training and evaluation."""

from __future__ import annotations

import torch

from ..data import CocoDataset, collate
from .config import TrainConfig


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
    train_ds = CocoDataset(
        cfg.data, cfg.train_split, labels=cfg.labels, flip_prob=cfg.flip_prob, seed=cfg.seed
    )
    val_ds = CocoDataset(cfg.data, cfg.val_split, labels=cfg.labels)
    if cfg.val_max_images:
        val_ds.ids = val_ds.ids[: cfg.val_max_images]
    if len(train_ds) < cfg.batch_size * world:
        raise ValueError(
            f"{len(train_ds)} training images are fewer than one global batch "
            f"({cfg.batch_size} x {world} processes)"
        )
    # DistributedSampler shuffles with a generator seeded by (seed + epoch): the order
    # depends on the epoch only, so a resumed run sees the same batches.
    train_sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        collate_fn=collate,
        num_workers=cfg.workers,
        drop_last=True,
        persistent_workers=False,
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds,
        batch_size=max(1, cfg.batch_size),
        sampler=ShardSampler(len(val_ds), rank, world),
        collate_fn=collate,
        num_workers=cfg.workers,
    )
    return train_loader, val_loader


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets
