"""The COCO-format loader and the synthetic shapes dataset."""

import json
import warnings

import numpy as np
import pytest
import torch

from models.data import CocoDataset, DatasetError, collate, find_split
from models.data.coco import hflip
from tools.shapes import main as shapes_main

from train_helpers import SIZE, make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=12, val=4, empty_every=6)


def _mask_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_counts_and_layout(shapes):
    data = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    ds = CocoDataset(shapes, "train")
    assert len(ds) == 12 == len(data["images"])
    assert len(ds.coco.anns) == len(data["annotations"]) > 12
    assert ds.num_classes == 4 and ds.class_names == [
        "__background__",
        "circle",
        "square",
        "triangle",
    ]
    total = sum(len(ds.load_target(i)["labels"]) for i in range(len(ds)))
    assert total == len(data["annotations"])
    assert len(CocoDataset(shapes, "val")) == 4


def test_boxes_masks_consistent(shapes):
    ds = CocoDataset(shapes, "train")
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        g = len(t["labels"])
        assert t["boxes"].shape == (g, 4) and t["masks"].shape == (g, SIZE, SIZE)
        assert t["masks"].dtype == torch.uint8 and t["labels"].dtype == torch.int64
        assert ((t["labels"] >= 1) & (t["labels"] <= 3)).all()
        for box, mask, area in zip(t["boxes"], t["masks"], t["area"]):
            assert box.tolist() == _mask_box(mask.numpy())
            assert mask.sum() == area


def test_rle_and_polygon_paths_decode_like_pycocotools(shapes):
    ds = CocoDataset(shapes, "train")
    kinds = set()
    for i in range(len(ds)):
        t = ds.load_target(i)
        anns = ds.coco.imgToAnns[ds.ids[i]]
        for ann, mask in zip(anns, t["masks"]):
            kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
            np.testing.assert_array_equal(mask.numpy(), ds.coco.annToMask(ann))
    assert kinds == {"polygon", "rle"}


def test_empty_images_and_collate(shapes):
    ds = CocoDataset(shapes, "train")
    empty = [i for i in range(len(ds)) if not ds.coco.imgToAnns.get(ds.ids[i])]
    assert empty, "empty_every=6 should give empty images"
    image, t = ds[empty[0]]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["masks"].shape == (0, SIZE, SIZE)
    assert len(CocoDataset(shapes, "train", drop_empty=True)) == len(ds) - len(empty)
    images, targets = collate([ds[0], ds[empty[0]]])
    assert len(images) == 2 and targets[1]["image_id"] == ds.ids[empty[0]]


def test_generator_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        shapes_main(
            [
                "--out",
                str(tmp_path / name),
                "--train",
                "3",
                "--val",
                "2",
                "--size",
                "48",
                "--seed",
                "7",
            ]
        )
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    shapes_main(
        ["--out", str(tmp_path / "c"), "--train", "3", "--val", "2", "--size", "48", "--seed", "8"]
    )
    assert (tmp_path / "a/train/000001.png").read_bytes() != (
        tmp_path / "c/train/000001.png"
    ).read_bytes()


def test_flip(shapes):
    ds = CocoDataset(shapes, "train")
    image, t = ds[0]
    fi, ft = hflip(image, t)
    assert torch.equal(fi, image.flip(-1))
    for box, mask in zip(ft["boxes"], ft["masks"]):
        assert box.tolist() == _mask_box(mask.numpy())
    # The flip draw depends on (seed, epoch, image) only, and about half the items flip.
    flipping = CocoDataset(shapes, "train", flip_prob=0.5, seed=3)
    draws = [flipping._flips(i) for i in range(len(flipping))]
    assert draws == [flipping._flips(i) for i in range(len(flipping))]
    assert 0 < sum(draws) < len(draws)
    flipping.set_epoch(1)
    assert draws != [flipping._flips(i) for i in range(len(flipping))]


def _write_custom(root, anns, categories=None, files=("a.png",), size=(20, 30)):
    """A hand-made COCO folder: images/ + annotations/instances_x.json."""
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    from PIL import Image

    images = []
    for k, f in enumerate(files, 1):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "images" / f)
        images.append({"id": k, "file_name": f, "height": h, "width": w})
    data = {
        "images": images,
        "annotations": anns,
        "categories": categories or [{"id": 1, "name": "thing"}],
    }
    (root / "annotations" / "instances_x.json").write_text(json.dumps(data))
    return root


def _poly_ann(id, poly, image_id=1, cat=1, **kw):
    xs, ys = poly[0::2], poly[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {
        "id": id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": [poly],
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": 0,
        **kw,
    }


def test_crowd_uncompressed_rle_and_label_modes(tmp_path):
    h, w = 20, 30
    m = np.zeros((h, w), np.uint8)
    m[2:9, 3:12] = 1
    # Uncompressed RLE (column-major run lengths), as COCO stores crowds.
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    crowd = {
        "id": 2,
        "image_id": 1,
        "category_id": 9,
        "iscrowd": 1,
        "area": int(m.sum()),
        "bbox": [3, 2, 9, 7],
        "segmentation": {"size": [h, w], "counts": counts},
    }
    cats = [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]
    root = _write_custom(
        tmp_path, [_poly_ann(1, [10, 10, 20, 10, 20, 18], cat=5), crowd], categories=cats
    )
    ds = CocoDataset(root, "x")
    t = ds.load_target(0)
    assert t["labels"].tolist() == [1] and ds.num_classes == 3
    ds = CocoDataset(root, "x", include_crowd=True, labels="category_id")
    t = ds.load_target(0)
    assert t["labels"].tolist() == [5, 9] and ds.num_classes == 10
    assert t["iscrowd"].tolist() == [0, 1]
    np.testing.assert_array_equal(t["masks"][1].numpy(), m)
    assert ds.label_to_category_id[9] == 9 and ds.class_names[9] == "nine"


def test_coco2017_layout(tmp_path):
    root = _write_custom(tmp_path, [_poly_ann(1, [1, 1, 10, 1, 10, 10])])
    (root / "images").rename(root / "val2017")
    (root / "annotations" / "instances_x.json").rename(
        root / "annotations" / "instances_val2017.json"
    )
    images, ann = find_split(root, "val")
    assert images == root / "val2017" and ann.name == "instances_val2017.json"
    assert len(CocoDataset(root, "val")) == 1
    with pytest.raises(DatasetError, match="no COCO-format split 'test'"):
        find_split(root, "test")


# ---- bad data ----


def test_malformed_json_names_the_file(tmp_path):
    root = _write_custom(tmp_path, [])
    f = root / "annotations" / "instances_x.json"
    f.write_text('{"images": [1, 2,')
    with pytest.raises(DatasetError, match=f"{f}: not valid JSON"):
        CocoDataset(root, "x")
    f.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['annotations', 'categories'\]"):
        CocoDataset(root, "x")


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"segmentation": [[1, 1, 500, 1, 500, 10]]}, "reaches outside the 30x20 image"),
        ({"segmentation": []}, "empty polygon list"),
        ({"segmentation": [[1, 1, 5, 5]]}, "at least 3"),
        ({"bbox": [40, 40, 5, 5]}, "no area inside"),
        ({"category_id": 77}, "category id 77"),
        ({"segmentation": {"size": [5, 5], "counts": "abc"}}, "RLE size"),
    ],
)
def test_bad_annotation_skipped_with_warning_or_strict_error(tmp_path, bad, why):
    good = _poly_ann(1, [1, 1, 10, 1, 10, 10])
    broken = {**_poly_ann(42, [2, 2, 12, 2, 12, 12]), **bad}
    root = _write_custom(tmp_path, [good, broken])
    with pytest.warns(UserWarning, match=f"annotation id 42: .*{why}"):
        ds = CocoDataset(root, "x")
    assert [a["id"] for a in ds.coco.anns.values()] == [1]
    assert len(ds[0][1]["labels"]) == 1
    with pytest.raises(DatasetError, match=f"instances_x.json: annotation id 42: .*{why}"):
        CocoDataset(root, "x", strict=True)


def test_missing_and_corrupt_image_files(tmp_path):
    root = _write_custom(
        tmp_path,
        [_poly_ann(1, [1, 1, 10, 1, 10, 10]), _poly_ann(2, [1, 1, 10, 1, 10, 10], image_id=2)],
        files=("a.png", "b.png"),
    )
    (root / "images" / "b.png").unlink()
    with pytest.warns(UserWarning, match=r"images/b.png \(image id 2\)"):
        ds = CocoDataset(root, "x")
    assert len(ds) == 1 and len(ds.coco.anns) == 1
    with pytest.raises(DatasetError, match=r"images/b.png: image file missing \(image id 2"):
        CocoDataset(root, "x", strict=True)
    (root / "images" / "a.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDataset(root, "x")
    with pytest.raises(DatasetError, match=r"images/a.png: cannot decode image \(image id 1\)"):
        ds[0]
