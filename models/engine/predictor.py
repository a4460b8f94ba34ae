"""Inference over image files: one image or many (folders, globs, list files), decoded in
DataLoader workers, sharded across ranks under torchrun, written as COCO results and drawn
(the predict tool: ``python -m tools.predict``).

``image`` takes one image, a folder (its images, not its subfolders), a glob (``**``
recurses) or a list file (``.txt``/``.lst``/``.list``: one path a line, relative to the list
file's folder; blank lines and ``#`` comments are ignored), or several of these.

``results`` gets COCO's results format: one entry per detection with ``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]`` in input pixels, ``score`` and ``segmentation``
(compressed RLE, ``counts`` a str). Image ids come from ``coco_annotations`` (matched by
file name) or are 1, 2, ... in sorted path order; then an images file (``images_json``,
default ``<results>.images.json``) lists ``{"images": [{"id", "file_name", "width",
"height"}], "categories": [{"id", "name"}], "skipped": [{"file_name", "error"}]}``, which
``pycocotools.coco.COCO`` loads (``COCO(images_json).loadRes(results)``). An image that
cannot be read is reported and skipped.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor

import maskops

from ..config import option
from ..visualize import draw_detections, save_image
from . import distributed as dist_utils
from .report import SILENT, Report

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io decodes
LIST_EXTENSIONS = (".txt", ".lst", ".list")


# ---- inputs ----


class InputError(ValueError):
    """An input that names no image (a missing path, an empty folder or glob)."""


def expand_inputs(specs: Sequence[str]) -> List[str]:
    """The image paths that ``specs`` name (files, folders, globs, list files), sorted and
    without duplicates; raises :class:`InputError` for a spec that names nothing."""
    paths: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = [
                os.path.join(spec, n)
                for n in os.listdir(spec)
                if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(spec, n))
            ]
            if not found:
                raise InputError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        elif os.path.isfile(spec) and spec.lower().endswith(LIST_EXTENSIONS):
            found = _read_list(spec)
        elif os.path.exists(spec):
            found = [spec]
        elif glob.has_magic(spec):
            found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not found:
                raise InputError(f"{spec}: the pattern matches no file")
        else:
            raise InputError(f"{spec}: no such file or folder")
        paths += found
    return sorted(set(os.path.normpath(p) for p in paths))


def _read_list(path: str) -> List[str]:
    base = os.path.dirname(path)
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
    if not out:
        raise InputError(f"{path}: the list file names no image")
    return out


@dataclass
class Item:
    """One entry of a batch: the image as ``uint8 Tensor[3, H, W]``, or ``image=None`` and
    ``error`` when it could not be read."""

    index: int
    path: str
    image: Optional[Tensor] = None
    error: str = ""


class ImageFiles(torch.utils.data.Dataset):
    """Decodes image files (in DataLoader workers). A file that fails to decode gives an
    :class:`Item` with its error instead of raising, so that one bad file does not end
    the run."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        path = self.paths[i]
        try:
            # uint8 crosses the worker boundary (4x less than float); RGB as read_image.
            img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
            if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(f"decoded to shape {tuple(img.shape)}")
        except Exception as e:  # noqa: BLE001 - any decoding failure skips the file
            msg = str(e).splitlines()[0] if str(e) else ""
            msg = re.sub(r"^\w+, \S+\.(?:cpp|cu|h):\d+, ", "", msg)[:200]  # torchvision's C++ site
            return Item(i, path, error=f"{type(e).__name__}: {msg}")
        return Item(i, path, img)


def collate_items(items: List[Item]) -> List[Item]:
    """A batch is the list of items as they are: the model takes a list of images of any
    sizes, and unreadable entries are kept (as markers) to be reported."""
    return list(items)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads


# ---- image ids and categories ----


def image_ids_from_annotations(paths: Sequence[str], ann_file: str) -> Dict[str, int]:
    """Maps each path to the id of the image of ``ann_file`` (COCO format) whose
    ``file_name`` is the longest trailing part of the path (``val2017/x.jpg`` or ``x.jpg``).
    Paths with no such image are left out."""
    with open(ann_file) as f:
        images = json.load(f).get("images")
    if not isinstance(images, list):
        raise InputError(f"{ann_file}: no 'images' list (not a COCO annotations file)")
    by_name = {
        os.path.normpath(str(im["file_name"])).replace(os.sep, "/"): int(im["id"]) for im in images
    }
    out = {}
    for p in paths:
        parts = os.path.normpath(p).replace(os.sep, "/").split("/")
        for k in range(len(parts)):
            key = "/".join(parts[k:])
            if key in by_name:
                out[p] = by_name[key]
                break
    return out


def categories(model) -> Tuple[List[int], List[dict]]:
    """``(label -> category id, COCO categories list)`` of the model: a ``--checkpoint``'s
    mapping, else the labels themselves (COCO category ids, torchvision's layout)."""
    names = list(model.class_names)
    mapping = model.label_to_category_id
    if mapping is None:
        mapping = list(range(len(names)))
    cats = [
        {"id": int(mapping[l]), "name": names[l] if l < len(names) else f"class {l}"}
        for l in range(1, len(mapping))
        if l >= len(names) or names[l] != "N/A"
    ]
    return list(mapping), cats


def detections_to_results(
    det: Dict[str, Tensor], image_id: int, label_to_category_id: Sequence[int]
) -> List[dict]:
    """One image's detections as COCO result entries.

    Args:
        det: ``boxes: Tensor[D, 4]`` (x1, y1, x2, y2) in input pixels, ``labels``,
            ``scores`` and optionally ``masks: Tensor[D, 1, H, W]`` (bool, or probabilities
            thresholded at 0.5).

    Returns:
        D dicts: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score`` and
        (with masks) ``segmentation``, compressed RLE with ``str`` counts.
    """
    boxes = det["boxes"].detach().float().cpu()
    if boxes.shape[0] == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det["scores"].detach().float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    out = [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_category_id[l]),
            "bbox": b,
            "score": s,
        }
        for b, s, l in zip(xywh, scores, labels)
    ]
    masks = det.get("masks")
    if masks is not None:
        masks = masks if masks.dtype == torch.bool else masks >= 0.5
        # masks_to_rle gives pycocotools' compressed form with bytes counts; JSON needs str.
        for entry, rle in zip(out, maskops.masks_to_rle(masks.cpu())):
            entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return out


def _draw_names(paths: Sequence[str]) -> Dict[str, str]:
    """Output file names for --draw-dir: ``<stem>.png``, or ``<stem>_<n>.png`` (n: the
    position in the sorted list) where stems repeat."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return {
        p: (s if counts[s] == 1 else f"{s}_{i}") + ".png"
        for i, (p, s) in enumerate(zip(paths, stems))
    }


# ---- the run ----


@dataclass
class PredictOptions:
    """What :func:`predict_files` does; the predict tool's options are these fields."""

    image: List[str] = option(
        [],
        "an image (PNG or JPEG), a folder, a glob or a list file (.txt); several may be given",
        flags=("--image", "--images"),
        nargs="+",
        required=True,
        metavar="PATH",
    )
    out: Optional[str] = option(None, "one image: where to write it with its detections drawn")
    score_thresh: float = option(
        0.5, "detections printed and drawn (the results keep all the model keeps)"
    )
    box_score_thresh: float = option(
        0.05,
        "the model's own score threshold: detections under it are dropped (also from --results)",
    )
    results: Optional[str] = option(None, "write COCO-format results JSON here")
    images_json: Optional[str] = option(
        None,
        "where to write the images list when ids are assigned (default: <results>.images.json)",
    )
    coco_annotations: Optional[str] = option(
        None, "a COCO annotations file: image ids are its ids, matched by file name"
    )
    draw_dir: Optional[str] = option(
        None, "write each image with its detections drawn here (<stem>.png)"
    )
    batch_size: int = option(1)
    workers: int = option(0, "DataLoader processes decoding images (0: in the main process)")
    progress: bool = option(True, "progress bar")


def predict_files(
    a: PredictOptions,
    load_model: Callable[[torch.device], torch.nn.Module],
    device: str = "cpu",
    autocast: Optional[Callable[[], Any]] = None,
    report: Report = SILENT,
) -> int:
    """Runs the model ``load_model(device)`` gives over the images ``a.image`` names (see the
    module docstring), this rank's share under torchrun, and writes what ``a`` asks for.
    Reports the detections (one image), progress, skipped images and the images/s.

    Returns:
        How many images were read (all ranks; 0 on ranks other than 0).

    Raises:
        InputError: an input names nothing, or the options contradict each other.
    """
    if a.batch_size < 1 or a.workers < 0:
        raise InputError(
            f"--batch-size must be >= 1 and --workers >= 0, got {a.batch_size} and {a.workers}"
        )
    single = (
        len(a.image) == 1
        and os.path.isfile(a.image[0])
        and not a.image[0].lower().endswith(LIST_EXTENSIONS)
    )
    paths = expand_inputs(a.image)
    if a.out and len(paths) != 1:
        raise InputError(f"--out draws one image, but the inputs name {len(paths)}: use --draw-dir")
    # Ids from the full sorted list, before sharding, so that every rank agrees.
    if a.coco_annotations:
        ids = image_ids_from_annotations(paths, a.coco_annotations)
        missing = [p for p in paths if p not in ids]
        for p in missing:
            report.line(f"skipped {p}: not in {a.coco_annotations}", err=True)
        if not ids:
            raise InputError(f"no input image is in {a.coco_annotations}")
        paths = [p for p in paths if p in ids]
    else:
        ids = {p: i + 1 for i, p in enumerate(paths)}
        missing = []
    draw_names = _draw_names(paths)

    rank_device = dist_utils.init(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main_rank = dist_utils.is_main_process()
    # dist_utils.init picks this rank's GPU (cuda:LOCAL_RANK) under torchrun.
    device = torch.device(device if device == "cpu" else rank_device)
    model = load_model(device)
    label_map, cats = categories(model)

    shard = paths[rank::world]
    loader = torch.utils.data.DataLoader(
        ImageFiles(shard),
        batch_size=a.batch_size,
        shuffle=False,
        num_workers=a.workers,
        collate_fn=collate_items,
        worker_init_fn=_worker_init if a.workers else None,
        pin_memory=device.type == "cuda",
    )
    bar = None
    if not single and main_rank and a.progress:
        bar = report.progress(
            len(shard), "predict" if world == 1 else f"predict (rank 0 of {world})", unit="img"
        )

    results: List[dict] = []
    images_meta: List[dict] = []
    skipped = [{"file_name": p, "error": f"not in {a.coco_annotations}"} for p in missing]
    kept = 0
    start = time.perf_counter()
    for batch in loader:
        good = [it for it in batch if it.image is not None]
        for it in batch:
            if it.image is None:
                report.line(f"skipped {it.path}: {it.error}", err=True)
                skipped.append({"file_name": it.path, "error": it.error})
        if good:
            # read_image's conversion, after the transfer (uint8 is what crosses processes).
            images = [it.image.to(device, non_blocking=True).float() / 255 for it in good]
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast() if autocast else contextlib.nullcontext():
                dets = model(images)
            elapsed = time.perf_counter() - t0
            for it, image, det in zip(good, images, dets):
                image_id = ids[it.path]
                h, w = int(image.shape[1]), int(image.shape[2])
                images_meta.append({"id": image_id, "file_name": it.path, "width": w, "height": h})
                if a.results:
                    results += detections_to_results(det, image_id, label_map)
                sel = det["scores"] >= a.score_thresh
                kept += int(sel.sum())
                if single:
                    _report_table(report, it.path, image, det, sel, a.score_thresh, elapsed, model)
                if a.out:
                    save_image(
                        draw_detections(image, det, a.score_thresh, names=model.class_names), a.out
                    )
                    report.line(f"wrote {a.out}")
                if a.draw_dir:
                    save_image(
                        draw_detections(image, det, a.score_thresh, names=model.class_names),
                        os.path.join(a.draw_dir, draw_names[it.path]),
                    )
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()

    # Rank 0 gathers every rank's part (gloo on the CPU: no shared file system needed).
    parts = dist_utils.gather_objects((results, images_meta, skipped, kept))
    seconds = time.perf_counter() - start
    if not main_rank:
        return 0
    results = [r for part in parts for r in part[0]]
    images_meta = sorted((m for part in parts for m in part[1]), key=lambda m: m["id"])
    skipped = sorted((s for part in parts for s in part[2]), key=lambda s: s["file_name"])
    kept = sum(part[3] for part in parts)
    results.sort(key=lambda r: r["image_id"])  # stable: each image's own order stays
    if a.results:
        _write_json(a.results, results)
        if not a.coco_annotations:
            images_json = a.images_json or os.path.splitext(a.results)[0] + ".images.json"
            _write_json(
                images_json, {"images": images_meta, "categories": cats, "skipped": skipped}
            )
    if not single:
        n = len(images_meta)
        report.line(
            f"{n} images ({len(skipped)} skipped), "
            f"{len(results) if a.results else kept} detections"
            f"{'' if a.results else f' with score >= {a.score_thresh}'}, "
            f"{seconds:.1f} s: {n / max(seconds, 1e-9):.2f} images/s"
            + (f" ({world} processes)" if world > 1 else "")
        )
    if a.results:
        report.line(f"wrote {a.results}")
    return len(images_meta)


def _report_table(
    report: Report,
    path: str,
    image: Tensor,
    det: Dict[str, Tensor],
    sel: Tensor,
    score_thresh: float,
    elapsed: float,
    model,
) -> None:
    report.line(
        f"{path}: {image.shape[2]}x{image.shape[1]}, {int(sel.sum())} detections with "
        f"score >= {score_thresh} ({len(det['scores'])} in all) in "
        f"{elapsed * 1e3:.0f} ms"
    )
    report.line(f"{'class':<16} {'score':>6}   box (x1, y1, x2, y2)")
    for box, label, score in zip(
        det["boxes"][sel].tolist(), det["labels"][sel].tolist(), det["scores"][sel].tolist()
    ):
        coords = ", ".join(f"{v:7.1f}" for v in box)
        name = model.class_names[label] if 0 <= label < len(model.class_names) else f"class {label}"
        report.line(f"{name:<16} {score:6.3f}   ({coords})")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
