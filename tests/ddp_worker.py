"""One rank of the DDP test (run by torchrun): trains the tiny model and saves this rank's
final weights as rank<R>.pt in the output folder's parent."""

import sys
from pathlib import Path

import torch

from models.engine import TrainConfig
from models.engine import distributed as dist_utils
from tools.train import train

from train_helpers import tiny_model


def main() -> None:
    data, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    cfg = ddp_config(data, out)
    result = train(cfg)
    torch.save(result.model.state_dict(), out.parent / f"rank{dist_utils.rank()}.pt")
    dist_utils.cleanup()


def ddp_config(data, out) -> TrainConfig:
    """GroupNorm (no batch statistics) and sample sizes above the candidate counts (every
    anchor and proposal used, so no random draw), so that the update is a pure function of
    each rank's images: DDP's average of the ranks' gradients can then be compared with a
    single process that averages the gradients of the same per-rank batches."""
    from train_helpers import tiny_config

    return tiny_config(
        data,
        out,
        model=tiny_model(rpn_batch_size_per_image=100_000, box_batch_size_per_image=100_000),
        epochs=2,
        iters_per_epoch=2,
        batch_size=1,
        flip_prob=0.5,
    )


if __name__ == "__main__":
    main()
