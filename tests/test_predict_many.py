"""python -m tools.predict over many images: folders, globs and list files, batches decoded
in DataLoader workers, COCO results JSON, unreadable files skipped, two ranks as torchrun
starts them.

A tiny GroupNorm model (a tools.train checkpoint with class names and a label -> category
id mapping) on five images of different sizes that all resize and pad to the same 64 x 64
batch: a batch then computes what each image alone computes, up to the rounding of batched
convolutions (measured: <= 1.2e-5 px, <= 3e-7 in score). Images padded to different sizes
would not: the padding changes the features near it, as in torchvision. And every resized
height is over 45.25 px: MultiScaleRoIAlign infers its scales from the batch's tallest
image, as torchvision does, and an image of 45 rows alone (padded to 64) gives the stride-4
level 16 / 45 rows, which rounds to a scale of 1/2 instead of 1/4 (in a batch with a
64-row image, 1/4)."""

import dataclasses
import json
import multiprocessing
import os
import socket
import sys
import traceback

import numpy as np
import pytest
import torch
import torchvision

from models.build import build_model, model_from_checkpoint
from models.engine.checkpoint import save_checkpoint
from models.visualize import read_image
from tools import predict

pytest.importorskip("pycocotools")
import pycocotools.mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from train_helpers import tiny_model  # noqa: E402  (tools.train reads COCO data)

NAMES = ["__background__", "disc", "square", "ring"]
CATEGORY_IDS = [0, 11, 22, 33]
SIZES = [(64, 64), (48, 64), (64, 80), (52, 60), (64, 48)]  # all pad to 64 x 64 at 64 / 64
BOX_SCORE_THRESH = 0.1  # random weights score ~0.15 - 0.32: no detection near the threshold
BOX_TOL, SCORE_TOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_many")
    # 200 detections per image: more than the 50 proposals x 3 classes, so no top-k cut.
    cfg = dataclasses.replace(tiny_model(), box_detections_per_img=200)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    ckpt = root / "best.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": {"model": cfg.to_dict()},
            "class_names": NAMES,
            "label_to_category_id": CATEGORY_IDS,
        },
        ckpt,
    )
    folder = root / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        img = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
        torchvision.io.write_png(img, str(folder / f"im{i}.png"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.md").write_text("not an image: not picked up from the folder")
    model, _ = model_from_checkpoint(ckpt, box_score_thresh=BOX_SCORE_THRESH)
    model.eval().mask_threshold = None  # probabilities: to judge pixels near 0.5
    alone = {}
    with torch.inference_mode():
        for i in range(len(SIZES)):
            path = os.path.normpath(str(folder / f"im{i}.png"))
            alone[path] = model([read_image(path)])[0]
    return {"root": root, "ckpt": str(ckpt), "folder": folder, "alone": alone}


@pytest.fixture(autouse=True)
def keep_threads():
    """The CLI's --threads sets torch's thread count for the whole process: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cli(setup, *args):
    return [
        "--checkpoint",
        setup["ckpt"],
        "--no-optimize",
        "--threads",
        "1",
        "--box-score-thresh",
        str(BOX_SCORE_THRESH),
        *args,
    ]


def _check_against_alone(results, images, alone):
    """Every image's result entries are the detections of the model on that image alone:
    the same number, each matched (same category, box within BOX_TOL px, score within
    SCORE_TOL) one to one, its decoded mask the alone mask. Compared as sets: detections of
    (nearly) equal score may swap places under rounding."""
    assert sorted(im["file_name"] for im in images) == sorted(alone)
    for im in images:
        det = alone[im["file_name"]]
        mine = [r for r in results if r["image_id"] == im["id"]]
        assert len(mine) == len(det["scores"]) > 0, im["file_name"]
        boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        scores = torch.tensor([r["score"] for r in mine], dtype=torch.float64)
        cats = torch.tensor([r["category_id"] for r in mine])
        want_cats = torch.tensor(CATEGORY_IDS)[det["labels"]]
        free = torch.ones(len(mine), dtype=torch.bool)
        for k in range(len(det["scores"])):
            ok = (
                free
                & (cats == want_cats[k])
                & ((scores - float(det["scores"][k])).abs() <= SCORE_TOL)
                & ((boxes - det["boxes"][k].double()).abs().amax(dim=1) <= BOX_TOL)
            )
            assert ok.any(), f"{im['file_name']}: detection {k} has no match"
            j = int(torch.nonzero(ok)[0])
            free[j] = False
            mask = mask_utils.decode(mine[j]["segmentation"])
            assert mask.shape == (im["height"], im["width"])
            prob = det["masks"][k, 0].numpy()
            # Random weights put many mask probabilities near 0.5: a pixel may flip only
            # where the probability alone is within rounding of it (measured: <= 1 pixel
            # of 4096 per mask, spread ~1e-6; 1e-3 allows for other machines' kernels).
            flipped = mask.astype(bool) != (prob >= 0.5)
            assert not (flipped & (np.abs(prob - 0.5) > 1e-3)).any(), im["file_name"]


def _injected_errors(results):
    def changed(edit):
        out = [dict(r) for r in results]
        edit(out)
        return out

    def move(out):
        out[0]["bbox"] = [out[0]["bbox"][0] + 0.01] + out[0]["bbox"][1:]

    def relabel(out):
        out[0]["category_id"] = (
            CATEGORY_IDS[1] if out[0]["category_id"] != CATEGORY_IDS[1] else CATEGORY_IDS[2]
        )

    def shift_mask(out):
        m = mask_utils.decode(out[0]["segmentation"])
        rle = mask_utils.encode(np.asfortranarray(np.roll(m, 1, axis=1)))
        out[0]["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}

    return [changed(move), changed(relabel), results[1:], changed(shift_mask)]


def _gt_coco(images, with_annotations=True):
    """A small ground truth over the predicted images: one box per image."""
    anns = []
    if with_annotations:
        for im in images:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im["id"],
                    "category_id": 11,
                    "bbox": [2, 2, 20, 20],
                    "area": 400,
                    "iscrowd": 0,
                    "segmentation": [[2, 2, 22, 2, 22, 22, 2, 22]],
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS[1:], NAMES[1:])],
    }
    gt.createIndex()
    return gt


def test_folder_in_batches_with_workers(setup, tmp_path, capsys):
    out = tmp_path / "dets.json"
    draw = tmp_path / "drawn"
    assert (
        predict.main(
            _cli(
                setup,
                "--image",
                str(setup["folder"]),
                "--batch-size",
                "2",
                "--workers",
                "1",
                "--results",
                str(out),
                "--draw-dir",
                str(draw),
                "--score-thresh",
                "0.0",
            )
        )
        == 0
    )
    cap = capsys.readouterr()
    broken = os.path.normpath(str(setup["folder"] / "broken.png"))
    assert f"skipped {broken}: " in cap.err  # named, and the run went on
    assert "images/s" in cap.out and "5 images (1 skipped)" in cap.out
    assert "predict" in cap.err and "img" in cap.err  # tqdm's bar on stderr
    results = json.loads(out.read_text())
    listing = json.loads((tmp_path / "dets.images.json").read_text())
    images = listing["images"]
    # Ids in sorted path order: broken.png (id 1, skipped), im0.png ... im4.png (2 ... 6).
    assert [im["id"] for im in images] == [2, 3, 4, 5, 6]
    assert [(im["height"], im["width"]) for im in images] == SIZES
    assert [s["file_name"] for s in listing["skipped"]] == [broken]
    assert listing["categories"] == [
        {"id": c, "name": n} for c, n in zip(CATEGORY_IDS[1:], NAMES[1:])
    ]
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS[1:])
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    _check_against_alone(results, images, setup["alone"])
    # ... and the check fails on real differences: a box moved, a class changed, a
    # detection dropped, a mask shifted by one pixel.
    for broken_results in _injected_errors(results):
        with pytest.raises(AssertionError):
            _check_against_alone(broken_results, images, setup["alone"])
    # pycocotools reads them: against the images file itself, and against a ground truth.
    dt = COCO(str(tmp_path / "dets.images.json")).loadRes(str(out))
    assert len(dt.getAnnIds()) == len(results)
    dt = _gt_coco(images).loadRes(str(out))
    assert all(a["area"] > 0 for a in dt.dataset["annotations"])
    assert sorted(p.name for p in draw.iterdir()) == [f"im{i}.png" for i in range(5)]
    assert torchvision.io.decode_image(str(draw / "im3.png")).shape == (3, 52, 60)


def test_glob_list_file_and_annotation_ids(setup, tmp_path, capsys):
    folder = setup["folder"]
    names = [os.path.normpath(str(folder / f"im{i}.png")) for i in range(5)]
    assert predict.expand_inputs([str(folder / "im*.png")]) == names
    assert predict.expand_inputs([str(folder)]) == sorted(
        names + [os.path.normpath(str(folder / "broken.png"))]
    )
    lst = tmp_path / "some.txt"
    lst.write_text(
        f"# two images, one relative to this file, one absolute\n\n"
        f"{os.path.relpath(names[3], tmp_path)}\n{names[1]}\n"
    )
    assert predict.expand_inputs([str(lst)]) == [names[1], names[3]]
    with pytest.raises(predict.InputError, match="matches no file"):
        predict.expand_inputs([str(folder / "*.jpeg")])
    assert predict.main(_cli(setup, "--image", str(folder / "missing.png"))) == 2
    assert "missing.png: no such file" in capsys.readouterr().err

    # Ids from a COCO annotations file, matched by file name; one listed image is not in it.
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 301, "file_name": "images/im1.png", "width": 64, "height": 48},
                    {"id": 7, "file_name": "im0.png"},
                ],
                "annotations": [],
                "categories": [],
            }
        )
    )
    lst.write_text(f"{names[1]}\n{names[0]}\n{names[2]}\n")
    out = tmp_path / "dets.json"
    assert (
        predict.main(
            _cli(
                setup,
                "--image",
                str(lst),
                "--batch-size",
                "3",
                "--results",
                str(out),
                "--coco-annotations",
                str(ann),
            )
        )
        == 0
    )
    cap = capsys.readouterr()
    assert f"skipped {names[2]}: not in {ann}" in cap.err
    results = json.loads(out.read_text())
    assert not (tmp_path / "dets.images.json").exists()
    images = [
        {"id": 7, "file_name": names[0], "width": 64, "height": 64},
        {"id": 301, "file_name": names[1], "width": 64, "height": 48},
    ]
    assert {r["image_id"] for r in results} == {7, 301}
    _check_against_alone(results, images, {n: setup["alone"][n] for n in names[:2]})


def test_one_image_keeps_the_table_and_a_bad_one_is_named(setup, tmp_path, capsys):
    path = os.path.normpath(str(setup["folder"] / "im1.png"))
    out = tmp_path / "one.json"
    assert (
        predict.main(_cli(setup, "--image", path, "--score-thresh", "0.2", "--results", str(out)))
        == 0
    )
    cap = capsys.readouterr()
    det = setup["alone"][path]
    assert (
        f"{path}: 64x48, {int((det['scores'] >= 0.2).sum())} detections with score >= 0.2 "
        f"({len(det['scores'])} in all)" in cap.out
    )
    assert "images/s" not in cap.out and "img/s" not in cap.err  # no bar for one image
    images = json.loads((tmp_path / "one.images.json").read_text())["images"]
    assert images == [{"id": 1, "file_name": path, "width": 64, "height": 48}]
    _check_against_alone(json.loads(out.read_text()), images, {path: det})
    broken = str(setup["folder"] / "broken.png")
    assert predict.main(_cli(setup, "--image", broken)) == 1  # nothing could be read
    assert f"skipped {os.path.normpath(broken)}: " in capsys.readouterr().err


def _rank(rank, port, argv, folder):
    """One rank, as torchrun would start it (the same environment variables), forked from
    the test process: no second import of torch, so the test takes seconds, not the ~25 s
    two fresh interpreters and torchrun's launcher take on a loaded two-core machine."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    code = 3
    with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
        sys.stdout, sys.stderr = out, err
        try:
            code = predict.main(argv)
        except BaseException:  # noqa: BLE001 - reported through the file and the exit code
            traceback.print_exc()
        out.flush()
        err.flush()
    os._exit(code)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_merge_their_shards(setup, tmp_path):
    out = tmp_path / "dets.json"
    argv = _cli(setup, "--image", str(setup["folder"]), "--batch-size", "2", "--results", str(out))
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, argv, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("rank*.*"))}
    assert [p.exitcode for p in procs] == [0, 0], logs
    assert "5 images (1 skipped)" in logs["rank0.out"] and "(2 processes)" in logs["rank0.out"]
    assert "images/s" not in logs["rank1.out"]  # rank 0 alone reports and writes
    # Rank 0 reads every other path (broken.png, im1, im3), rank 1 the rest.
    broken = os.path.normpath(str(setup["folder"] / "broken.png"))
    assert f"skipped {broken}: " in logs["rank0.err"] and "broken" not in logs["rank1.err"]
    results = json.loads(out.read_text())
    images = json.loads((tmp_path / "dets.images.json").read_text())["images"]
    assert [im["id"] for im in images] == [2, 3, 4, 5, 6]
    ids = [r["image_id"] for r in results]
    assert ids == sorted(ids) and set(ids) == {2, 3, 4, 5, 6}
    _check_against_alone(results, images, setup["alone"])
