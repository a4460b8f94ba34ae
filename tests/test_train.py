"""Training: loss decrease, overfitting one image, checkpoints, resume, and resilience."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.build import build_model
from models.data import CocoDataset, collate
from models.engine import TrainConfig, config_differences, train_step
from models.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.evaluation import coco_evaluate, detections_to_coco
from tools.train import train

from train_helpers import make_shapes, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=8, val=3)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_few_iterations_loss_decreases(shapes):
    torch.manual_seed(0)
    model = build_model(tiny_model()).train()
    ds = CocoDataset(shapes, "train")
    batch = collate([ds[0], ds[1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = [
        train_step(model, opt, [batch], torch.device("cpu"), clip_grad=10.0) for _ in range(8)
    ]
    assert set(losses[0]) >= {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss",
    }
    assert losses[-1]["loss"] < 0.7 * losses[0]["loss"]
    assert losses[-1]["loss_mask"] < losses[0]["loss_mask"]


def test_overfit_one_image_reaches_mask_ap50(shapes):
    torch.manual_seed(0)
    ds = CocoDataset(shapes, "train", image_ids=[1])
    model = build_model(tiny_model(box_score_thresh=0.3)).train()
    batch = collate([ds[0]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 60)
    for _ in range(60):
        train_step(model, opt, [batch], torch.device("cpu"), clip_grad=10.0)
        sched.step()
    model.eval()
    with torch.no_grad():
        dets = model(batch[0])
    res = coco_evaluate(ds.coco, detections_to_coco(dets, [1], ds.label_to_category_id), [1])
    assert res.get("segm", "AP50") >= 0.9, res.summary


def _state(path):
    return load_checkpoint(path)["model"]


def test_run_writes_outputs_and_resume_is_exact(shapes, tmp_path, capsys):
    straight = train(tiny_config(shapes, tmp_path / "a"))
    out = capsys.readouterr().out
    assert "| epoch | loss | box AP | mask AP | AP50 (mask) | time |" in out
    assert out.count("| 2 |") == 2  # the epoch's row, then the final table
    for f in ("last.pt", "best.pt", "metrics.csv", "metrics.png", "config.json"):
        assert (tmp_path / "a" / f).is_file(), f
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "box_AP", "mask_AP", "mask_AP50", "epoch_time"} <= set(rows[0])

    train(tiny_config(shapes, tmp_path / "b", stop_after=1))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = train(tiny_config(shapes, tmp_path / "b", resume="auto"))
    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]


def test_resume_with_changed_config_is_refused(shapes, tmp_path):
    train(tiny_config(shapes, tmp_path, epochs=1, iters_per_epoch=1))
    changed = tiny_config(
        shapes,
        tmp_path,
        epochs=1,
        iters_per_epoch=1,
        lr=0.5,
        model=tiny_model(fpn_channels=16),
        resume="auto",
    )
    with pytest.raises(CheckpointError) as e:
        train(changed)
    msg = str(e.value)
    assert str(tmp_path / "last.pt") in msg
    assert "lr: checkpoint 0.01, now 0.5" in msg and "model.fpn_channels" in msg
    assert "epochs" not in msg and "out" not in msg


def test_config_differences_ignores_output_options():
    a = TrainConfig(out="x", workers=0).to_dict()
    b = TrainConfig(out="y", workers=4, batch_size=3).to_dict()
    assert config_differences(a, b) == ["batch_size: checkpoint 2, now 3"]


def test_corrupted_checkpoint_names_the_file(tmp_path, capsys, shapes):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(1000.0)}, "epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 1
    data = bytearray(path.read_bytes())
    # Damaged tensor bytes: the archive still opens, the digest catches it.
    i = data.find(torch.arange(1000.0).numpy().tobytes()[:64])
    data[i + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupted"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated or corrupted"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    # The command line reports it and exits with status 2, without a traceback.
    from tools.train import main

    args = [
        "--data",
        str(shapes),
        "--out",
        str(tmp_path),
        "--resume",
        str(path),
        "--backbone",
        "resnet18",
        "--min-size",
        "64",
        "--max-size",
        "64",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} is truncated or corrupted" in err and "Traceback" not in err


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _cli(shapes, out, *extra):
    return [
        sys.executable,
        "-m",
        "tools.train",
        "--data",
        str(shapes),
        "--out",
        str(out),
        "--backbone",
        "resnet18",
        "--norm",
        "gn",
        "--fpn-channels",
        "32",
        "--representation-size",
        "64",
        "--mask-head-channels",
        "32",
        "--mask-head-convs",
        "1",
        "--anchor-sizes",
        "8",
        "16",
        "32",
        "64",
        "128",
        "--min-size",
        "64",
        "--max-size",
        "64",
        "--rpn-pre-nms-top-n-train",
        "200",
        "--rpn-post-nms-top-n-train",
        "100",
        "--rpn-pre-nms-top-n-test",
        "100",
        "--rpn-post-nms-top-n-test",
        "50",
        "--batch-size",
        "1",
        "--lr",
        "0.01",
        "--warmup-iters",
        "2",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


def test_sigterm_mid_epoch_leaves_last_checkpoint_loadable(shapes, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        _cli(shapes, out, "--epochs", "3", "--iters-per-epoch", "8"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # epoch 2 has just begun
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert f"stopped by SIGTERM; the last complete checkpoint is {out / 'last.pt'}" in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # ... and the run can be resumed from it.
    done = subprocess.run(
        _cli(
            shapes, out, "--epochs", "3", "--iters-per-epoch", "8", "--resume", "--stop-after", "1"
        ),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_bf16_autocast_step_and_fp16_needs_gpu(shapes):
    from models.engine import autocast_dtype

    torch.manual_seed(0)
    model = build_model(tiny_model()).train()
    ds = CocoDataset(shapes, "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = train_step(
        model,
        opt,
        [collate([ds[0]])],
        torch.device("cpu"),
        amp_dtype=autocast_dtype("bf16", torch.device("cpu")),
        clip_grad=10.0,
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        autocast_dtype("fp16", torch.device("cpu"))
