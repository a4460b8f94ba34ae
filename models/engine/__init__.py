"""The training engine: the loop and its parts, one module each.

``config`` (TrainConfig), ``loop`` (train, train_step, optimiser, schedule), ``loaders``
(samplers and data loaders), ``checkpoint`` (atomic, checked files), ``rng``, ``signals``
(clean stop), ``amp`` (half precision), ``metrics`` (table, csv, plot), ``schedule`` (warmup +
step / cosine), ``distributed`` (torchrun / DDP), ``report`` (where progress goes),
``predictor`` (inference over image files), ``demo`` (the end-to-end demo).

Names are loaded on first use, so that importing one part does not import the loop.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "config_differences": "config",
    "train": "loop",
    "train_step": "loop",
    "TrainResult": "loop",
    "NonFiniteLoss": "loop",
    "make_optimizer": "loop",
    "make_schedule": "loop",
    "ShardSampler": "loaders",
    "make_loaders": "loaders",
    "seed_everything": "rng",
    "StopRequest": "signals",
    "TrainingInterrupted": "signals",
    "autocast_dtype": "amp",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "Report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
