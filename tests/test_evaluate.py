"""The COCOeval wrapper and the evaluate command."""

import json

import pytest
import torch
from pycocotools import mask as mask_utils

import maskops
from models.data import CocoDataset
from models.evaluation import coco_evaluate, detections_to_coco

from train_helpers import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=2, val=6)


def _perfect(ds):
    dets, ids = [], []
    for i in range(len(ds)):
        t = ds.load_target(i)
        g = len(t["labels"])
        dets.append(
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.ones(g),
                "masks": t["masks"][:, None].bool(),
            }
        )
        ids.append(t["image_id"])
    return dets, ids


def test_perfect_predictions_score_one(shapes):
    ds = CocoDataset(shapes, "val")
    dets, ids = _perfect(ds)
    res = coco_evaluate(ds.coco, detections_to_coco(dets, ids, ds.label_to_category_id), ids)
    for iou_type in ("bbox", "segm"):
        assert res.get(iou_type, "AP") == pytest.approx(1.0)
        assert res.get(iou_type, "AP50") == pytest.approx(1.0)
        present = {ds.class_names[int(l)] for d in dets for l in d["labels"]}
        for name in present:
            assert res.per_class[iou_type][name] == pytest.approx(1.0)
    assert "| circle |" in res.per_class_table()


def test_empty_predictions_score_zero(shapes):
    ds = CocoDataset(shapes, "val")
    ids = list(ds.ids)
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 64, 64, dtype=torch.bool),
        }
        for _ in ids
    ]
    res = coco_evaluate(ds.coco, detections_to_coco(empty, ids, ds.label_to_category_id), ids)
    assert res.get("bbox", "AP") == 0.0 and res.get("segm", "AP") == 0.0
    assert res.num_detections == 0


def test_wrong_class_and_shifted_boxes_score_below_one(shapes):
    ds = CocoDataset(shapes, "val")
    dets, ids = _perfect(ds)
    dets[0]["boxes"] = dets[0]["boxes"] + 6
    dets[1]["labels"] = dets[1]["labels"] % 3 + 1
    res = coco_evaluate(ds.coco, detections_to_coco(dets, ids, ds.label_to_category_id), ids)
    assert 0.2 < res.get("bbox", "AP") < 1.0


def test_mask_probabilities_are_pasted_with_maskops(shapes):
    # 28x28 probability masks are pasted into the image and thresholded at 0.5 by
    # maskops.paste_masks, then encoded by maskops.masks_to_rle.
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0]])
    probs = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    det = {
        "boxes": boxes,
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.9]),
        "masks": probs,
        "image_size": (64, 64),
    }
    out = detections_to_coco([det], [7], [0, 1])
    rle = out["segm"][0]["segmentation"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    expected = maskops.paste_masks(probs, boxes, (64, 64), threshold=0.5)[0, 0]
    assert torch.equal(torch.from_numpy(decoded).bool(), expected)
    assert out["bbox"][0]["bbox"] == [4.0, 6.0, 26.0, 34.0]
    json.dumps(out)  # results are JSON-serialisable


def test_evaluate_cli_on_torchvision_layout_weights(shapes, tmp_path, capsys):
    # A torchvision Mask R-CNN state_dict (random weights) loads and is scored.
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from tools.evaluate import main

    torch.manual_seed(0)
    tv = torchvision.models.detection.MaskRCNN(
        resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=4
    )
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    rc = main(
        [
            "--data",
            str(shapes),
            "--split",
            "val",
            "--weights",
            str(path),
            "--backbone",
            "resnet18",
            "--labels",
            "contiguous",
            "--bn-eps",
            "1e-5",
            "--min-size",
            "64",
            "--max-size",
            "64",
            "--max-images",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "mask AP" in out and "| triangle |" in out


def test_evaluate_cli_bad_weights_file(shapes, tmp_path, capsys):
    from tools.evaluate import main

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    assert (
        main(
            [
                "--data",
                str(shapes),
                "--weights",
                str(bad),
                "--backbone",
                "resnet18",
                "--labels",
                "contiguous",
            ]
        )
        == 2
    )
    assert str(bad) in capsys.readouterr().err
