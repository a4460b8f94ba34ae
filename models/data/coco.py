"""A COCO-format instance segmentation dataset, read with pycocotools.

Layout (COCO 2017, or anything shaped like it)::

    ROOT/annotations/instances_<split>.json   ROOT/<split>/<file_name>
    ROOT/annotations/instances_<split>2017.json   ROOT/<split>2017/<file_name>   (COCO 2017)
    ROOT/annotations/instances_<split>.json   ROOT/images/<file_name>

Labels. With ``labels="contiguous"`` (the default) the dataset's category ids, sorted, become
labels ``1..K`` and the model needs ``num_classes = K + 1``; with ``labels="category_id"``
the category ids are the labels and ``num_classes = max id + 1`` (91 for COCO, the layout of
torchvision's COCO checkpoints). ``label_to_category_id`` maps back for evaluation; both
modes give the same labels on datasets whose ids are already ``1..K`` (the shapes dataset).

Bad data is found when the dataset is opened, not in the middle of training:

- an annotations file that is missing, is not JSON, or lacks ``images`` / ``annotations`` /
  ``categories``: :class:`DatasetError` naming the file (always);
- an annotation with an unknown image or category, a missing, empty or malformed
  segmentation, a polygon with fewer than 3 points or with points outside the image, an RLE
  of the wrong size, or a box with no area inside the image; and an image whose file is
  missing: skipped, with one warning naming the file and the annotation / image ids
  (``strict=True`` raises :class:`DatasetError` instead).

An image file that exists but cannot be decoded, or whose size differs from the JSON's,
raises :class:`DatasetError` naming the file when it is read.

Crowd annotations (``iscrowd: 1``, usually uncompressed RLE) are parsed and validated like the
others; they are left out of the training targets unless ``include_crowd=True`` (the model has
no notion of crowds; COCOeval reads them from :attr:`CocoDataset.coco`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

# Polygon points may stray this many pixels outside the image (annotation tools round
# outwards); beyond it the polygon is treated as bad data rather than silently clipped.
POLYGON_TOLERANCE = 2.0


class DatasetError(ValueError):
    """Bad dataset files: the message names the file and, where there is one, the
    annotation or image id."""


def find_split(root, split: str) -> Tuple[Path, Path]:
    """Locates the images folder and annotations file of ``split`` under ``root``.

    Args:
        root: dataset folder.
        split: ``"train"``, ``"val"``, ``"val2017"``...

    Returns:
        ``(images_dir, annotation_file)``.

    Raises:
        DatasetError: nothing matching any known layout; the message lists what was tried.
    """
    root = Path(root)
    candidates = [
        (root / split, root / "annotations" / f"instances_{split}.json"),
        (root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
        (root / "images", root / "annotations" / f"instances_{split}.json"),
        (root / "images", root / f"instances_{split}.json"),
    ]
    for images, ann in candidates:
        if ann.is_file() and images.is_dir():
            return images, ann
    tried = "; ".join(f"{a} with {i}/" for i, a in candidates)
    raise DatasetError(f"no COCO-format split {split!r} under {root}: tried {tried}")


def load_coco_json(path) -> dict:
    """Reads an instances JSON file, checking that it is a COCO instances file.

    Raises:
        DatasetError: unreadable file, invalid JSON, or missing top-level keys.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the annotations file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: not a COCO instances file (top level is a "
            f"{type(data).__name__}, expected an object)"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file: missing key(s) {missing}")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise DatasetError(f"{path}: '{k}' must be a list, got {type(data[k]).__name__}")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not all(
            k in img for k in ("id", "file_name", "height", "width")
        ):
            raise DatasetError(
                f"{path}: images[{i}] needs id, file_name, height and width, got {str(img)[:200]}"
            )
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DatasetError(f"{path}: categories[{i}] needs an id, got {str(cat)[:200]}")
    return data


def _finite(values) -> bool:
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def check_annotation(ann: dict, images: Dict[int, dict], category_ids) -> Optional[str]:
    """Why ``ann`` cannot be used, or ``None`` when it can.

    Args:
        ann: one entry of the file's ``annotations``.
        images: the file's images by id.
        category_ids: the file's category ids.
    """
    if not isinstance(ann, dict):
        return "not an object"
    if "id" not in ann:
        return "has no id"
    if ann.get("image_id") not in images:
        return f"refers to image id {ann.get('image_id')!r}, which is not in 'images'"
    if ann.get("category_id") not in category_ids:
        return f"refers to category id {ann.get('category_id')!r}, which is not in 'categories'"
    img = images[ann["image_id"]]
    h, w = img["height"], img["width"]
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _finite(bbox):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    x, y, bw, bh = bbox
    if min(x + bw, w) - max(x, 0) <= 0 or min(y + bh, h) - max(y, 0) <= 0:
        return f"bbox {bbox} has no area inside the {w}x{h} image"
    seg = ann.get("segmentation")
    if seg is None:
        return "has no segmentation"
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list"
        for p, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not _finite(poly):
                return (
                    f"polygon {p} must be a flat list of at least 3 (x, y) points, got "
                    f"{str(poly)[:80]}"
                )
            xs, ys = poly[0::2], poly[1::2]
            t = POLYGON_TOLERANCE
            if min(xs) < -t or min(ys) < -t or max(xs) > w + t or max(ys) > h + t:
                return (
                    f"polygon {p} reaches outside the {w}x{h} image (x in [{min(xs)}, "
                    f"{max(xs)}], y in [{min(ys)}, {max(ys)}])"
                )
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if list(size or []) != [h, w]:
            return f"RLE size {size} differs from the image's [{h}, {w}]"
        if isinstance(counts, list):
            if not _finite(counts) or any(c < 0 for c in counts) or sum(counts) != h * w:
                return f"uncompressed RLE counts must be non-negative and sum to {h * w}"
        elif not isinstance(counts, (str, bytes)) or not counts:
            return "RLE counts must be a list or a non-empty string"
        return None
    return f"segmentation must be polygons or an RLE, got {type(seg).__name__}"


def annotation_to_mask(seg, height: int, width: int) -> np.ndarray:
    """Decodes a polygon list or an RLE (compressed or not) to a ``uint8 [height, width]``
    array."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance targets of one COCO-format split.

    Args:
        root: dataset folder (see the module docstring for the layouts found), or ``None``
            with ``images_dir`` and ``annotation_file`` given.
        split: the split's name (``train``, ``val``, ``val2017``...).
        images_dir, annotation_file: explicit paths (override the layout search).
        labels: ``"contiguous"`` or ``"category_id"`` (see the module docstring).
        flip_prob: probability of a horizontal flip per sample (0 for evaluation). The draw
            depends on ``(seed, epoch, index)`` only (:meth:`set_epoch`), not on a global
            RNG, so that runs are reproducible with any number of loader workers or ranks.
        seed: seed of the flip draws.
        include_crowd: keep crowd annotations in the targets.
        drop_empty: leave out images without (usable) annotations.
        image_ids: keep only these image ids, in this order.
        strict: raise :class:`DatasetError` on bad annotations and missing image files
            instead of skipping them with a warning.

    Each item is ``(image, target)``: ``image`` a float ``Tensor[3, H, W]`` in ``[0, 1]``,
    ``target`` ``{"boxes": Tensor[G, 4] float32 (x1, y1, x2, y2) pixels, "labels":
    Tensor[G] int64, "masks": Tensor[G, H, W] uint8, "image_id": int, "iscrowd":
    Tensor[G] int64, "area": Tensor[G] float32}`` (``G`` may be 0).
    """

    def __init__(
        self,
        root=None,
        split: str = "train",
        *,
        images_dir=None,
        annotation_file=None,
        labels: str = "contiguous",
        flip_prob: float = 0.0,
        seed: int = 0,
        include_crowd: bool = False,
        drop_empty: bool = False,
        image_ids: Optional[Sequence[int]] = None,
        strict: bool = False,
    ) -> None:
        if labels not in ("contiguous", "category_id"):
            raise ValueError(f"labels must be 'contiguous' or 'category_id', got {labels!r}")
        if images_dir is None or annotation_file is None:
            if root is None:
                raise ValueError("give root (and split), or images_dir and annotation_file")
            images_dir, annotation_file = find_split(root, split)
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.include_crowd = include_crowd
        self.strict = strict

        data = load_coco_json(self.annotation_file)
        data = self._drop_bad(data)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()

        self.category_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        if labels == "contiguous":
            self.label_to_category_id = [0] + self.category_ids
        else:
            top = max(self.category_ids, default=0)
            self.label_to_category_id = list(range(top + 1))
        self.category_id_to_label = {
            c: i for i, c in enumerate(self.label_to_category_id) if i > 0 and c in names
        }
        self.num_classes = len(self.label_to_category_id)
        self.class_names = ["__background__"] + [
            names.get(c, "N/A") for c in self.label_to_category_id[1:]
        ]

        ids = list(image_ids) if image_ids is not None else sorted(self.coco.imgs)
        unknown = [i for i in ids if i not in self.coco.imgs]
        if unknown:
            raise DatasetError(
                f"{self.annotation_file}: image ids {unknown[:10]} are not in the "
                "file (or were skipped as bad)"
            )
        if drop_empty:
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids

    # ---- validation ----

    def _drop_bad(self, data: dict) -> dict:
        """Removes unusable annotations and images whose files are missing (or raises, with
        ``strict``), warning once with the ids."""
        images = {img["id"]: img for img in data["images"]}
        category_ids = {c["id"] for c in data["categories"]}
        bad_anns: List[Tuple[object, str]] = []
        anns = []
        for ann in data["annotations"]:
            why = check_annotation(ann, images, category_ids)
            if why is None:
                anns.append(ann)
            else:
                bad_anns.append((ann.get("id") if isinstance(ann, dict) else None, why))
        missing = [
            img for img in data["images"] if not (self.images_dir / img["file_name"]).is_file()
        ]
        if self.strict and (bad_anns or missing):
            if bad_anns:
                ann_id, why = bad_anns[0]
                raise DatasetError(
                    f"{self.annotation_file}: annotation id {ann_id}: {why}"
                    + (
                        f" (and {len(bad_anns) - 1} more bad annotations)"
                        if len(bad_anns) > 1
                        else ""
                    )
                )
            img = missing[0]
            raise DatasetError(
                f"{self.images_dir / img['file_name']}: image file missing "
                f"(image id {img['id']} in {self.annotation_file})"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if bad_anns:
            shown = "; ".join(f"annotation id {i}: {why}" for i, why in bad_anns[:5])
            warnings.warn(
                f"{self.annotation_file}: skipping {len(bad_anns)} bad annotation(s): "
                f"{shown}" + (" ..." if len(bad_anns) > 5 else ""),
                stacklevel=3,
            )
        if missing:
            shown = ", ".join(
                f"{self.images_dir / m['file_name']} (image id {m['id']})" for m in missing[:5]
            )
            warnings.warn(
                f"{self.annotation_file}: skipping {len(missing)} image(s) whose file "
                f"is missing: {shown}" + (" ..." if len(missing) > 5 else ""),
                stacklevel=3,
            )
        gone = {m["id"] for m in missing}
        out = dict(data)
        out["images"] = [img for img in data["images"] if img["id"] not in gone]
        out["annotations"] = []
        for ann in anns:
            if ann["image_id"] in gone:
                continue
            # COCOeval reads area and iscrowd; fill them when a hand-made file lacks them.
            if "area" not in ann or "iscrowd" not in ann:
                ann = dict(ann)
                ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
                ann.setdefault("iscrowd", 0)
            out["annotations"].append(ann)
        return out

    # ---- items ----

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that the flip draws depend on."""
        self.epoch = int(epoch)

    def _annotations(self, image_id: int) -> List[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if not self.include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        return anns

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> Tensor:
        """The image of item ``index`` as a float ``Tensor[3, H, W]`` in ``[0, 1]``."""
        info = self.coco.imgs[self.ids[index]]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DatasetError(
                f"{path}: cannot decode image (image id {info['id']}): {e}"
            ) from None
        if array.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {array.shape[1]}x{array.shape[0]} but "
                f"{self.annotation_file} says {info['width']}x{info['height']} "
                f"(image id {info['id']})"
            )
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def load_target(self, index: int) -> Dict[str, Tensor]:
        """The target of item ``index`` (no augmentation)."""
        info = self.coco.imgs[self.ids[index]]
        h, w = info["height"], info["width"]
        anns = self._annotations(info["id"])
        boxes, labels, masks, crowd, area = [], [], [], [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            boxes.append([max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)])
            labels.append(self.category_id_to_label[a["category_id"]])
            masks.append(annotation_to_mask(a["segmentation"], h, w))
            crowd.append(int(a.get("iscrowd", 0)))
            area.append(float(a.get("area", bw * bh)))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros((0, h, w), dtype=torch.uint8)
            ),
            "image_id": int(info["id"]),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
            "area": torch.tensor(area, dtype=torch.float32),
        }

    def _flips(self, index: int) -> bool:
        if self.flip_prob <= 0:
            return False
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(self.ids[index])
        )
        return bool(torch.rand((), generator=g) < self.flip_prob)

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image = self.load_image(index)
        target = self.load_target(index)
        if self._flips(index):
            image, target = hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.annotation_file}, images={len(self)}, "
            f"classes={self.num_classes - 1}, flip_prob={self.flip_prob})"
        )


def hflip(image: Tensor, target: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Mirrors an image and its target left to right."""
    w = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch):
    """``[(image, target), ...]`` -> ``(list of images, list of targets)`` (images of
    different sizes are batched by the model's transform)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def num_workers_default() -> int:
    """Loader workers: none on small machines, where the decode is cheaper than the IPC."""
    return 0 if (os.cpu_count() or 1) <= 4 else 4


def dataset_num_classes(data: str, split: str, labels: str) -> int:
    """Classes (background included) of a split, from its categories only."""
    _, ann = find_split(data, split)
    ids = [c["id"] for c in load_coco_json(ann)["categories"]]
    return (len(ids) if labels == "contiguous" else max(ids, default=0)) + 1
