"""Distributed data parallel training: 2 CPU processes (gloo) launched by torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from models.build import build_model
from models.engine import make_loaders, make_optimizer, make_schedule, seed_everything, train_step
from models.engine.checkpoint import load_checkpoint
from models.engine.schedule import build_scheduler

from ddp_worker import ddp_config
from train_helpers import make_shapes

REPO = Path(__file__).resolve().parents[1]


def _single_process_reference(cfg, ranks=(0, 1)):
    """The same run in one process: each step averages the gradients of rank 0's and rank
    1's batches (what DDP's all-reduce computes)."""
    seed_everything(cfg.seed)
    loaders = [make_loaders(cfg, r, 2)[0] for r in ranks]
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    iters = min(len(loaders[0]), cfg.iters_per_epoch)
    sched = build_scheduler(opt, make_schedule(cfg, iters))
    for epoch in range(1, cfg.epochs + 1):
        for ld in loaders:
            ld.sampler.set_epoch(epoch)
            ld.dataset.set_epoch(epoch)
        for it, batches in enumerate(zip(*loaders)):
            if it >= iters:
                break
            train_step(
                model.train(), opt, list(batches), torch.device("cpu"), clip_grad=cfg.clip_grad
            )
            sched.step()
    return model.state_dict()


def test_two_process_gloo_matches_single_process(tmp_path):
    data = make_shapes(tmp_path / "shapes", train=8, val=2)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            str(REPO / "tests" / "ddp_worker.py"),
            str(data),
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"

    # Rank 0 alone wrote the outputs, with the gathered evaluation of both ranks' shards.
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["config"]["world_size"] == 2
    assert proc.stdout.count("| 2 |") == 2
    for k in r0:
        assert torch.equal(state["model"][k], r0[k])

    torch.set_num_threads(1)
    ref = _single_process_reference(ddp_config(data, out))
    for k, v in ref.items():
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=f"weights differ in {k}")
    # The comparison means something only if training moved the weights.
    seed_everything(0)
    init = build_model(ddp_config(data, out).model).state_dict()
    assert any(not torch.allclose(init[k], ref[k]) for k in ref if ref[k].is_floating_point())
    # ... and only if one rank's batches alone would give other weights.
    alone = _single_process_reference(ddp_config(data, out), ranks=(0,))
    assert any(
        not torch.allclose(alone[k], ref[k], rtol=1e-4, atol=1e-5)
        for k in ref
        if ref[k].is_floating_point()
    )
