"""maskops as a drop-in for torchvision.ops, checked against torchvision itself:

* every bad call of a public op with a torchvision counterpart goes through both libraries;
  where both raise, maskops' TypeError / ValueError is also an instance of torchvision's class;
  where only one raises, the case is a documented difference (README, "Differences from
  torchvision");
* integer boxes in the box ops give torchvision's dtypes and values;
* torch.fx symbolic tracing of modules that call maskops, and of what torchvision itself can
  trace once patched, gives the eager results;
* sampling_ratio has a limit, checked in Python and in C++.
"""

import math
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.fx
import torchvision
from torchvision import ops as tv
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import maskops
from maskops import _validate as V

from helpers import devices, random_boxes

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


# ---- 1. the same mistake through both libraries ----


def _inputs(device="cpu"):
    """Fresh random inputs; every case breaks one thing about them."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    boxes = random_boxes(3, (40, 40), g, min_size=2.0)
    t = {
        "x": torch.randn(2, 3, 8, 8, generator=g),
        "rois": torch.cat([torch.tensor([[0.0], [1.0]]), random_boxes(2, (8, 8), g)], dim=1),
        "boxes": boxes,
        "scores": torch.rand(3, generator=g),
        "idxs": torch.randint(0, 2, (3,), generator=g),
        "l0": torch.randn(1, 2, 16, 16, generator=g),
        "l1": torch.randn(1, 2, 8, 8, generator=g),
        "masks": torch.rand(3, 1, 28, 28, generator=g),
        "codes": torch.randn(3, 4, generator=g),
        "big": random_boxes(1100, (100, 100), g),  # torchvision's batched_nms' other path
        "big_scores": torch.rand(1100, generator=g),
    }
    t = {k: v.to(device) for k, v in t.items()}
    t["feats"] = OrderedDict([("0", t["l0"]), ("1", t["l1"])])
    t["image"] = ImageList(torch.zeros(1, 3, 64, 64, device=device), [(64, 64)])
    return t


def _meta(x):
    return x.to("meta")  # a second device on machines with only a CPU


def _roi(lib):
    return lambda x, boxes, *a, **k: lib.roi_align(x, boxes, *a, **k)


def _roi_module(lib):
    def call(x, boxes, output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=False):
        return lib.RoIAlign(output_size, spatial_scale, sampling_ratio, aligned)(x, boxes)

    return call


def _ms(lib, names=("0", "1"), output_size=2, sampling_ratio=2, **kw):
    return lambda x, boxes, shapes: lib.MultiScaleRoIAlign(
        list(names), output_size, sampling_ratio, **kw
    )(x, boxes, shapes)


def _coder(lib):
    return (tv_det_utils.BoxCoder if lib is tv else maskops.BoxCoder)((10.0, 10.0, 5.0, 5.0))


def _anchor_gen(lib, sizes=((16,), (32,)), ratios=((0.5, 1.0),) * 2):
    return (TVAnchorGenerator if lib is tv else maskops.AnchorGenerator)(sizes, ratios)


def _paste(lib):
    return tv_paste if lib is tv else maskops.paste_masks_in_image


def _clip(lib):
    return tv.clip_boxes_to_image if lib is tv else maskops.clip_boxes


# (id, call(lib, t), expected): `lib` is torchvision.ops or maskops. expected:
#   "same"     both raise; maskops' error is a TypeError or ValueError and also torchvision's class
#   "stricter" torchvision returns, maskops refuses (a documented difference)
#   "wider"    torchvision raises, maskops returns (a documented difference)
#   "ok"       both return
# Calls that crash or hang torchvision are not made through it (see TORCHVISION_CRASHES).
CASES = []


def case(name, expected, call):
    CASES.append((name, call, expected))


for form, make in (("roi_align", _roi), ("RoIAlign", _roi_module)):

    def R(lib, *a, make=make, **k):
        return make(lib)(*a, **k)

    case(f"{form} input list", "same", lambda L, t, R=R: R(L, [t["x"]], t["rois"], 2))
    case(f"{form} input int", "same", lambda L, t, R=R: R(L, t["x"].long(), t["rois"], 2))
    case(f"{form} input bool", "same", lambda L, t, R=R: R(L, t["x"] > 0, t["rois"], 2))
    case(
        f"{form} input complex",
        "same",
        lambda L, t, R=R: R(L, t["x"].to(torch.complex64), t["rois"], 2),
    )
    case(f"{form} input 3d", "same", lambda L, t, R=R: R(L, t["x"][0], t["rois"], 2))
    case(f"{form} input 5d", "stricter", lambda L, t, R=R: R(L, t["x"][None], t["rois"], 2))
    case(f"{form} rois [K, 4]", "same", lambda L, t, R=R: R(L, t["x"], t["rois"][:, :4], 2))
    case(
        f"{form} rois [K, 6]",
        "same",
        lambda L, t, R=R: R(L, t["x"], torch.cat([t["rois"], t["rois"][:, :1]], 1), 2),
    )
    case(f"{form} rois 1d", "same", lambda L, t, R=R: R(L, t["x"], t["rois"][0], 2))
    case(f"{form} rois 3d", "same", lambda L, t, R=R: R(L, t["x"], t["rois"][None], 2))
    case(f"{form} rois int", "same", lambda L, t, R=R: R(L, t["x"], t["rois"].int(), 2))
    case(
        f"{form} rois float64, input float32",
        "wider",
        lambda L, t, R=R: R(L, t["x"], t["rois"].double(), 2),
    )
    case(
        f"{form} rois float32, input float16",
        "wider",
        lambda L, t, R=R: R(L, t["x"].half(), t["rois"], 2),
    )
    case(
        f"{form} rois float32, input float64",
        "wider",
        lambda L, t, R=R: R(L, t["x"].double(), t["rois"], 2),
    )
    case(
        f"{form} rois on another device",
        "stricter",
        lambda L, t, R=R: R(L, t["x"], _meta(t["rois"]), 2),
    )
    case(f"{form} list [L, 3]", "same", lambda L, t, R=R: R(L, t["x"], [t["boxes"][:, :3]], 2))
    case(f"{form} list [L, 5]", "same", lambda L, t, R=R: R(L, t["x"], [t["rois"]], 2))
    case(f"{form} list 1d", "same", lambda L, t, R=R: R(L, t["x"], [t["boxes"][0]], 2))
    case(f"{form} list int", "same", lambda L, t, R=R: R(L, t["x"], [t["boxes"].long()], 2))
    case(f"{form} list of lists", "same", lambda L, t, R=R: R(L, t["x"], [t["boxes"].tolist()], 2))
    case(
        f"{form} list on another device",
        "stricter",
        lambda L, t, R=R: R(L, t["x"], [_meta(t["boxes"])], 2),
    )
    case(
        f"{form} list mixed dtypes",
        "wider",
        lambda L, t, R=R: R(L, t["x"], [t["boxes"], t["boxes"].double()], 2),
    )
    case(f"{form} empty list", "wider", lambda L, t, R=R: R(L, t["x"], [], 2))
    case(f"{form} boxes str", "same", lambda L, t, R=R: R(L, t["x"], "boxes", 2))
    case(f"{form} boxes None", "same", lambda L, t, R=R: R(L, t["x"], None, 2))
    case(f"{form} output_size 0", "stricter", lambda L, t, R=R: R(L, t["x"], t["rois"], 0))
    case(f"{form} output_size negative", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], -1))
    case(f"{form} output_size (3, -1)", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], (3, -1)))
    case(f"{form} output_size (3,)", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], (3,)))
    case(
        f"{form} output_size (3, 3, 3)",
        "stricter",
        lambda L, t, R=R: R(L, t["x"], t["rois"], (3, 3, 3)),
    )
    case(f"{form} output_size float", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], 2.0))
    case(
        f"{form} output_size (2, 2.0)", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], (2, 2.0))
    )
    case(f"{form} output_size str", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], "2"))
    case(f"{form} output_size None", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], None))
    case(f"{form} output_size bool", "stricter", lambda L, t, R=R: R(L, t["x"], t["rois"], True))
    case(f"{form} spatial_scale 0", "stricter", lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 0.0))
    case(
        f"{form} spatial_scale negative",
        "stricter",
        lambda L, t, R=R: R(L, t["x"], t["rois"], 2, -0.5),
    )
    case(
        f"{form} spatial_scale NaN",
        "stricter",
        lambda L, t, R=R: R(L, t["x"], t["rois"], 2, math.nan, -1),
    )
    case(f"{form} spatial_scale str", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], 2, "1"))
    case(
        f"{form} sampling_ratio float",
        "same",
        lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 1.0, 2.5),
    )
    case(
        f"{form} sampling_ratio str", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 1.0, "2")
    )
    case(
        f"{form} sampling_ratio negative",
        "ok",
        lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 1.0, -3),
    )
    case(
        f"{form} sampling_ratio 1024",
        "ok",
        lambda L, t, R=R: R(L, t["x"], t["rois"][:1], 1, 1.0, 1024),
    )
    case(f"{form} aligned int", "stricter", lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 1.0, 2, 1))
    case(f"{form} aligned str", "same", lambda L, t, R=R: R(L, t["x"], t["rois"], 2, 1.0, 2, "yes"))
    case(f"{form} no boxes", "ok", lambda L, t, R=R: R(L, t["x"], t["rois"][:0], 2))

for name, expected, build in [
    ("output_size 0", "stricter", lambda L: L.RoIAlign(0, 1.0, 2)),
    ("output_size (3, 3, 3)", "stricter", lambda L: L.RoIAlign((3, 3, 3), 1.0, 2)),
    ("spatial_scale str", "stricter", lambda L: L.RoIAlign(2, "1", 2)),
    ("sampling_ratio float", "stricter", lambda L: L.RoIAlign(2, 1.0, 2.5)),
    ("aligned int", "stricter", lambda L: L.RoIAlign(2, 1.0, 2, 1)),
]:
    # maskops checks the arguments when the module is built (torchvision at its first call).
    case(f"RoIAlign constructor {name}", expected, lambda L, t, build=build: build(L))

M = _ms
for name, expected, call in [
    ("x a list", "same", lambda L, t: M(L)([t["l0"]], [t["boxes"]], [(64, 64)])),
    ("no map named", "same", lambda L, t: M(L, names=["a"])(t["feats"], [t["boxes"]], [(64, 64)])),
    ("image_shapes empty", "same", lambda L, t: M(L)(t["feats"], [t["boxes"]], [])),
    ("image_shapes of ints", "same", lambda L, t: M(L)(t["feats"], [t["boxes"]], [64])),
    (
        "boxes a [K, 5] tensor",
        "wider",
        lambda L, t: M(L)(t["feats"], torch.cat([torch.zeros(3, 1), t["boxes"]], 1), [(64, 64)]),
    ),
    ("boxes a [K, 4] tensor", "same", lambda L, t: M(L)(t["feats"], t["boxes"], [(64, 64)])),
    ("boxes str", "same", lambda L, t: M(L)(t["feats"], "boxes", [(64, 64)])),
    (
        "boxes str, one level",
        "same",
        lambda L, t: M(L, names=["0"])(t["feats"], "boxes", [(64, 64)]),
    ),
    ("boxes [L, 3]", "same", lambda L, t: M(L)(t["feats"], [t["boxes"][:, :3]], [(64, 64)])),
    (
        "boxes [L, 3], one level",
        "same",
        lambda L, t: M(L, names=["0"])(t["feats"], [t["boxes"][:, :3]], [(64, 64)]),
    ),
    ("boxes [L, 5]", "same", lambda L, t: M(L)(t["feats"], [t["rois"]], [(64, 64)])),
    ("boxes 1d", "same", lambda L, t: M(L)(t["feats"], [t["boxes"][0]], [(64, 64)])),
    ("boxes int", "same", lambda L, t: M(L)(t["feats"], [t["boxes"].long()], [(64, 64)])),
    (
        "boxes int, one level",
        "same",
        lambda L, t: M(L, names=["0"])(t["feats"], [t["boxes"].long()], [(64, 64)]),
    ),
    (
        "boxes on another device",
        "same",
        lambda L, t: M(L)(t["feats"], [_meta(t["boxes"])], [(64, 64)]),
    ),
    (
        "levels' channels differ",
        "stricter",
        lambda L, t: M(L)({"0": t["l0"], "1": t["l1"][:, :1]}, [t["boxes"]], [(64, 64)]),
    ),
    (
        "levels' dtypes differ",
        "same",
        lambda L, t: M(L)({"0": t["l0"], "1": t["l1"].double()}, [t["boxes"]], [(64, 64)]),
    ),
    (
        "features 3d",
        "same",
        lambda L, t: M(L)({"0": t["l0"][0], "1": t["l1"][0]}, [t["boxes"]], [(64, 64)]),
    ),
    (
        "features int",
        "same",
        lambda L, t: M(L)({"0": t["l0"].long(), "1": t["l1"].long()}, [t["boxes"]], [(64, 64)]),
    ),
    (
        "levels not halving",
        "stricter",
        lambda L, t: M(L)({"0": t["l0"], "1": t["l1"][..., :5, :5]}, [t["boxes"]], [(64, 64)]),
    ),
    (
        "output_size 0",
        "stricter",
        lambda L, t: M(L, output_size=0)(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    (
        "output_size (2, 2, 2)",
        "same",
        lambda L, t: M(L, output_size=(2, 2, 2))(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    (
        "sampling_ratio float",
        "same",
        lambda L, t: M(L, sampling_ratio=2.5)(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    (
        "canonical_scale negative",
        "stricter",
        lambda L, t: M(L, canonical_scale=-1)(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    (
        "canonical_scale str",
        "same",
        lambda L, t: M(L, canonical_scale="224")(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    (
        "canonical_level None",
        "same",
        lambda L, t: M(L, canonical_level=None)(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
    ("valid call", "ok", lambda L, t: M(L)(t["feats"], [t["boxes"]], [(60, 50)])),
]:
    case(f"MultiScaleRoIAlign {name}", expected, call)

for name, expected, args in [
    ("boxes [4], scores [3]", "same", lambda t: (torch.rand(4), torch.rand(3), 0.5)),
    ("boxes 3 columns", "same", lambda t: (t["boxes"][:, :3], t["scores"], 0.5)),
    (
        "boxes 5 columns",
        "same",
        lambda t: (torch.cat([t["boxes"], t["scores"][:, None]], 1), t["scores"], 0.5),
    ),
    ("boxes 3d", "same", lambda t: (t["boxes"][None], t["scores"], 0.5)),
    ("boxes a list", "same", lambda t: (t["boxes"].tolist(), t["scores"], 0.5)),
    ("boxes int64", "same", lambda t: (t["boxes"].long(), t["scores"], 0.5)),
    ("boxes int32", "same", lambda t: (t["boxes"].int(), t["scores"], 0.5)),
    ("boxes bool", "same", lambda t: (t["boxes"] > 3, t["scores"], 0.5)),
    ("boxes float16", "wider", lambda t: (t["boxes"].half(), t["scores"].half(), 0.5)),
    ("boxes bfloat16", "wider", lambda t: (t["boxes"].bfloat16(), t["scores"].bfloat16(), 0.5)),
    ("scores int", "same", lambda t: (t["boxes"], (t["scores"] * 10).long(), 0.5)),
    ("scores float64, boxes float32", "wider", lambda t: (t["boxes"], t["scores"].double(), 0.5)),
    ("scores too short", "same", lambda t: (t["boxes"], t["scores"][:2], 0.5)),
    ("scores 2d", "same", lambda t: (t["boxes"], t["scores"][:, None], 0.5)),
    ("scores 0d", "same", lambda t: (t["boxes"], t["scores"][0], 0.5)),
    ("scores a list", "same", lambda t: (t["boxes"], t["scores"].tolist(), 0.5)),
    ("scores on another device", "same", lambda t: (t["boxes"], _meta(t["scores"]), 0.5)),
    ("boxes on another device", "same", lambda t: (_meta(t["boxes"]), t["scores"], 0.5)),
    ("iou_threshold str", "same", lambda t: (t["boxes"], t["scores"], "0.5")),
    ("iou_threshold None", "same", lambda t: (t["boxes"], t["scores"], None)),
    ("iou_threshold NaN", "stricter", lambda t: (t["boxes"], t["scores"], math.nan)),
    (
        "iou_threshold a 0-d tensor",
        "stricter",
        lambda t: (t["boxes"], t["scores"], torch.tensor(0.5)),
    ),
    ("no boxes", "ok", lambda t: (t["boxes"][:0], t["scores"][:0], 0.5)),
    # No boxes of any dtype: no indices (torchvision's CUDA nms too; its CPU nms refuses).
    ("no boxes, int64", "wider", lambda t: (t["boxes"][:0].long(), t["scores"][:0], 0.5)),
    ("no boxes, int8", "wider", lambda t: (t["boxes"][:0].to(torch.int8), t["scores"][:0], 0.5)),
    ("no boxes, int scores", "wider", lambda t: (t["boxes"][:0], t["scores"][:0].long(), 0.5)),
    ("no boxes, scores [1]", "same", lambda t: (t["boxes"][:0], t["scores"][:1], 0.5)),
    ("no boxes, 1d", "same", lambda t: (torch.empty(0), torch.empty(0), 0.5)),
    ("no boxes, [0, 3]", "same", lambda t: (torch.empty(0, 3), torch.empty(0), 0.5)),
]:
    case(f"nms {name}", expected, lambda L, t, args=args: L.nms(*args(t)))

for name, expected, args in [
    ("boxes 3 columns", "same", lambda t: (t["boxes"][:, :3], t["scores"], t["idxs"], 0.5)),
    ("boxes [4], scores [3]", "stricter", lambda t: (torch.rand(4), torch.rand(3), t["idxs"], 0.5)),
    ("boxes 1d", "stricter", lambda t: (t["boxes"][0], t["scores"], t["idxs"], 0.5)),
    ("boxes a list", "same", lambda t: (t["boxes"].tolist(), t["scores"], t["idxs"], 0.5)),
    ("boxes int", "same", lambda t: (t["boxes"].long(), t["scores"], t["idxs"], 0.5)),
    ("scores too short", "same", lambda t: (t["boxes"], t["scores"][:2], t["idxs"], 0.5)),
    ("scores int", "same", lambda t: (t["boxes"], (t["scores"] * 9).long(), t["idxs"], 0.5)),
    ("scores a list", "same", lambda t: (t["boxes"], t["scores"].tolist(), t["idxs"], 0.5)),
    ("idxs float", "stricter", lambda t: (t["boxes"], t["scores"], t["idxs"].float(), 0.5)),
    ("idxs bool", "stricter", lambda t: (t["boxes"], t["scores"], t["idxs"].bool(), 0.5)),
    ("idxs too short", "same", lambda t: (t["boxes"], t["scores"], t["idxs"][:2], 0.5)),
    ("idxs 2d", "same", lambda t: (t["boxes"], t["scores"], t["idxs"][:, None], 0.5)),
    ("idxs on another device", "same", lambda t: (t["boxes"], t["scores"], _meta(t["idxs"]), 0.5)),
    ("idxs a list", "same", lambda t: (t["boxes"], t["scores"], t["idxs"].tolist(), 0.5)),
    ("iou_threshold str", "same", lambda t: (t["boxes"], t["scores"], t["idxs"], "0.5")),
    ("no boxes", "ok", lambda t: (t["boxes"][:0], t["scores"][:0], t["idxs"][:0], 0.5)),
    (
        "no boxes, int64",
        "ok",
        lambda t: (t["boxes"][:0].long(), t["scores"][:0], t["idxs"][:0], 0.5),
    ),
    (
        "no boxes, uint8, int scores, float idxs",
        "ok",
        lambda t: (
            t["boxes"][:0].to(torch.uint8),
            t["scores"][:0].long(),
            t["idxs"][:0].float(),
            0.5,
        ),
    ),
    (
        "no boxes, 1d",
        "ok",
        lambda t: (torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5),
    ),
    (
        "over 1000 boxes, 3 columns",
        "same",
        lambda t: (t["big"][:, :3], t["big_scores"], torch.zeros(1100, dtype=torch.long), 0.5),
    ),
    (
        "over 1000 boxes, scores too short",
        "same",
        lambda t: (t["big"], t["big_scores"][:-1], torch.zeros(1100, dtype=torch.long), 0.5),
    ),
    (
        "over 1000 boxes, int",
        "same",
        lambda t: (t["big"].long(), t["big_scores"], torch.zeros(1100, dtype=torch.long), 0.5),
    ),
    (
        "over 1000 boxes, idxs 2d",
        "stricter",
        lambda t: (t["big"], t["big_scores"], torch.zeros(1100, 1, dtype=torch.long), 0.5),
    ),
]:
    case(f"batched_nms {name}", expected, lambda L, t, args=args: L.batched_nms(*args(t)))

for name, expected, args in [
    ("3 columns", "same", lambda t: (t["boxes"][:, :3],)),
    ("0d", "same", lambda t: (torch.tensor(1.0),)),
    ("a list", "same", lambda t: (t["boxes"].tolist(),)),
    ("[4]", "ok", lambda t: (t["boxes"][0],)),
    ("[1, 3, 4]", "ok", lambda t: (t["boxes"][None],)),
    ("int8", "ok", lambda t: (t["boxes"].to(torch.int8),)),
    ("uint8", "ok", lambda t: (t["boxes"].to(torch.uint8),)),
    ("int64", "ok", lambda t: (t["boxes"].long(),)),
    ("no boxes, int32", "ok", lambda t: (t["boxes"][:0].int(),)),
    ("bool", "stricter", lambda t: (t["boxes"] > 3,)),
    ("fmt xyxy", "ok", lambda t: (t["boxes"], "xyxy")),
    ("fmt cxcywh", "stricter", lambda t: (t["boxes"], "cxcywh")),
    ("fmt unknown", "same", lambda t: (t["boxes"], "xy")),
]:
    case(f"box_area {name}", expected, lambda L, t, args=args: L.box_area(*args(t)))

for name, expected, args in [
    ("boxes2 2 columns", "same", lambda t: (t["boxes"], t["boxes"][:, :2])),
    ("boxes1 3 columns", "same", lambda t: (t["boxes"][:, :3], t["boxes"])),
    ("boxes1 a list", "same", lambda t: (t["boxes"].tolist(), t["boxes"])),
    ("boxes2 a list", "same", lambda t: (t["boxes"], t["boxes"].tolist())),
    ("bool", "same", lambda t: (t["boxes"] > 3, t["boxes"] > 3)),
    ("boxes2 on another device", "same", lambda t: (t["boxes"], _meta(t["boxes"]))),
    ("boxes1 1d", "stricter", lambda t: (t["boxes"][0], t["boxes"])),
    ("batched [1, N, 4]", "stricter", lambda t: (t["boxes"][None], t["boxes"][None])),
    ("int64", "ok", lambda t: (t["boxes"].long(), t["boxes"].long())),
    ("int16", "ok", lambda t: (t["boxes"].to(torch.int16), t["boxes"].to(torch.int16))),
    ("int and float", "ok", lambda t: (t["boxes"].long(), t["boxes"])),
    ("fmt cxcywh", "stricter", lambda t: (t["boxes"], t["boxes"], "cxcywh")),
    ("fmt unknown", "same", lambda t: (t["boxes"], t["boxes"], "xy")),
]:
    case(f"box_iou {name}", expected, lambda L, t, args=args: L.box_iou(*args(t)))

for name, expected, args in [
    ("3 columns", "same", lambda t: (t["boxes"][:, :3], (30, 30))),
    ("0d", "same", lambda t: (torch.tensor(1.0), (30, 30))),
    ("a list", "same", lambda t: (t["boxes"].tolist(), (30, 30))),
    ("size an int", "same", lambda t: (t["boxes"], 30)),
    ("size (30, 30, 3)", "same", lambda t: (t["boxes"], (30, 30, 3))),
    ("size (30,)", "same", lambda t: (t["boxes"], (30,))),
    ("size of floats", "stricter", lambda t: (t["boxes"], (30.5, 30.0))),
    ("size negative", "stricter", lambda t: (t["boxes"], (-3, 30))),
    ("size a tensor", "stricter", lambda t: (t["boxes"], torch.tensor([30, 30]))),
    ("size of 0-d tensors", "ok", lambda t: (t["boxes"], (torch.tensor(30), torch.tensor(20)))),
    ("bool", "stricter", lambda t: (t["boxes"] > 3, (30, 30))),
    ("int8", "ok", lambda t: (t["boxes"].to(torch.int8), (30, 20))),
    ("int8, size past int8's range", "wider", lambda t: (t["boxes"].to(torch.int8), (300, 20))),
    ("int64 [1, 3, 4]", "ok", lambda t: (t["boxes"].long()[None], (30, 20))),
]:
    case(f"clip_boxes {name}", expected, lambda L, t, args=args: _clip(L)(*args(t)))

for name, expected, args in [
    ("3 columns", "same", lambda t: (t["boxes"][:, :3], 5.0)),
    ("0d", "same", lambda t: (torch.tensor(1.0), 5.0)),
    ("a list", "same", lambda t: (t["boxes"].tolist(), 5.0)),
    ("1d", "stricter", lambda t: (t["boxes"][0], 5.0)),
    ("3d", "stricter", lambda t: (t["boxes"][None], 5.0)),
    ("bool", "same", lambda t: (t["boxes"] > 3, 0.5)),
    ("min_size str", "same", lambda t: (t["boxes"], "1")),
    ("min_size negative", "stricter", lambda t: (t["boxes"], -1.0)),
    ("min_size NaN", "stricter", lambda t: (t["boxes"], math.nan)),
    ("min_size a 0-d tensor", "stricter", lambda t: (t["boxes"], torch.tensor(5.0))),
    ("int16", "ok", lambda t: (t["boxes"].to(torch.int16), 5.0)),
    ("no boxes, int64", "ok", lambda t: (t["boxes"][:0].long(), 1.0)),
]:
    case(
        f"remove_small_boxes {name}",
        expected,
        lambda L, t, args=args: L.remove_small_boxes(*args(t)),
    )

for name, expected, args in [
    ("masks 3d", "same", lambda t: (t["masks"][:, 0], t["boxes"], (50, 50))),
    ("masks a list", "same", lambda t: (t["masks"].tolist(), t["boxes"], (50, 50))),
    ("masks bool", "same", lambda t: (t["masks"] > 0.5, t["boxes"], (50, 50))),
    ("masks int", "same", lambda t: ((t["masks"] * 10).long(), t["boxes"], (50, 50))),
    ("masks not square", "stricter", lambda t: (t["masks"][..., :20], t["boxes"], (50, 50))),
    ("fewer boxes than masks", "stricter", lambda t: (t["masks"], t["boxes"][:2], (50, 50))),
    ("boxes 3 columns", "same", lambda t: (t["masks"], t["boxes"][:, :3], (50, 50))),
    ("boxes on another device", "same", lambda t: (t["masks"], _meta(t["boxes"]), (50, 50))),
    ("boxes int", "ok", lambda t: (t["masks"], t["boxes"].long(), (50, 50))),
    ("size an int", "same", lambda t: (t["masks"], t["boxes"], 50)),
    ("size negative", "same", lambda t: (t["masks"], t["boxes"], (50, -2))),
    ("size of floats", "same", lambda t: (t["masks"], t["boxes"], (50.0, 50.0))),
    ("padding negative", "stricter", lambda t: (t["masks"], t["boxes"], (50, 50), -1)),
    ("padding float", "same", lambda t: (t["masks"], t["boxes"], (50, 50), 1.5)),
    ("no masks", "ok", lambda t: (t["masks"][:0], t["boxes"][:0], (50, 50))),
]:
    case(f"paste_masks_in_image {name}", expected, lambda L, t, args=args: _paste(L)(*args(t)))

for name, expected, call in [
    ("decode codes 3 columns", "same", lambda c, t: c.decode_single(t["codes"][:, :3], t["boxes"])),
    ("decode rows mismatch", "same", lambda c, t: c.decode_single(t["codes"][:2], t["boxes"])),
    ("decode boxes 3 columns", "same", lambda c, t: c.decode_single(t["codes"], t["boxes"][:, :3])),
    ("decode codes int", "stricter", lambda c, t: c.decode_single(t["codes"].long(), t["boxes"])),
    ("decode boxes int", "ok", lambda c, t: c.decode_single(t["codes"], t["boxes"].long())),
    ("decode boxes not a list", "same", lambda c, t: c.decode(t["codes"], t["boxes"])),
    (
        "decode boxes on another device",
        "same",
        lambda c, t: c.decode_single(t["codes"], _meta(t["boxes"])),
    ),
    ("encode rows mismatch", "same", lambda c, t: c.encode_single(t["boxes"], t["boxes"][:2])),
    (
        "encode 3 columns",
        "same",
        lambda c, t: c.encode_single(t["boxes"][:, :3], t["boxes"][:, :3]),
    ),
    ("encode int", "stricter", lambda c, t: c.encode_single(t["boxes"].long(), t["boxes"].long())),
]:
    case(f"BoxCoder {name}", expected, lambda L, t, call=call: call(_coder(L), t))

for name, expected, weights in [
    ("3 weights", "same", (1.0, 1.0, 1.0)),
    ("negative weight", "stricter", (1.0, 1.0, -1.0, 1.0)),
    ("zero weight", "stricter", (0.0, 1.0, 1.0, 1.0)),
]:
    case(
        f"BoxCoder {name}",
        expected,
        lambda L, t, w=weights: (tv_det_utils.BoxCoder if L is tv else maskops.BoxCoder)(
            w
        ).encode_single(t["boxes"], t["boxes"] + 1),
    )

A = _anchor_gen
for name, expected, call in [
    ("fewer maps than levels", "same", lambda L, t: A(L)(t["image"], [t["l0"]])),
    (
        "feature maps 1d",
        "same",
        lambda L, t: A(L)(t["image"], [t["l0"].flatten(), t["l1"].flatten()]),
    ),
    ("empty feature grid", "same", lambda L, t: A(L)(t["image"], [t["l0"][..., :0, :], t["l1"]])),
    ("sizes empty", "same", lambda L, t: A(L, sizes=(), ratios=())(t["image"], [t["l0"]])),
    (
        "more ratio levels than size levels",
        "stricter",
        lambda L, t: A(L, ratios=((0.5, 1.0),) * 3)(t["image"], [t["l0"], t["l1"]]),
    ),
    (
        "feature maps int",
        "stricter",
        lambda L, t: A(L)(t["image"], [t["l0"].long(), t["l1"].long()]),
    ),
    (
        "negative size",
        "stricter",
        lambda L, t: A(L, sizes=((-16,), (32,)))(t["image"], [t["l0"], t["l1"]]),
    ),
    (
        "ratio 0",
        "stricter",
        lambda L, t: A(L, ratios=((0.0, 1.0),) * 2)(t["image"], [t["l0"], t["l1"]]),
    ),
    ("half feature maps", "ok", lambda L, t: A(L)(t["image"], [t["l0"].half(), t["l1"].half()])),
]:
    case(f"AnchorGenerator {name}", expected, call)

# torchvision reads out of bounds (a batch index outside the batch: garbage or a segmentation
# fault), crashes, runs out of memory or runs for minutes on these; maskops refuses them with a
# ValueError. Not run through torchvision.
TORCHVISION_CRASHES = [
    (
        "roi_align batch index too high",
        lambda L, t: L.roi_align(t["x"], t["rois"] + torch.tensor([2.0, 0, 0, 0, 0]), 2),
    ),
    (
        "roi_align batch index negative",
        lambda L, t: L.roi_align(t["x"], t["rois"] - torch.tensor([1.0, 0, 0, 0, 0]), 2),
    ),
    (
        "roi_align batch index NaN",
        lambda L, t: L.roi_align(t["x"], torch.full((1, 5), math.nan), 2),
    ),
    ("roi_align list longer than the batch", lambda L, t: L.roi_align(t["x"], [t["boxes"]] * 3, 2)),
    ("RoIAlign batch index too high", lambda L, t: L.RoIAlign(2, 1.0, 2)(t["x"], t["rois"] * 3)),
    (
        "MultiScaleRoIAlign more box lists than images",
        lambda L, t: _ms(L)(t["feats"], [t["boxes"]] * 2, [(64, 64)] * 2),
    ),
    (
        "roi_align spatial_scale inf, sampling_ratio 2",
        lambda L, t: L.roi_align(t["x"], t["rois"], 2, math.inf, 2),
    ),
    ("roi_align sampling_ratio 10**9", lambda L, t: L.roi_align(t["x"], t["rois"], 7, 1.0, 10**9)),
    ("roi_align sampling_ratio 10**5", lambda L, t: L.roi_align(t["x"], t["rois"], 7, 1.0, 10**5)),
    ("roi_align sampling_ratio 2000", lambda L, t: L.roi_align(t["x"], t["rois"], 7, 1.0, 2000)),
    (
        "MultiScaleRoIAlign sampling_ratio 10**5",
        lambda L, t: _ms(L, sampling_ratio=10**5)(t["feats"], [t["boxes"]], [(64, 64)]),
    ),
]


def _outcome(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return None, e


@pytest.mark.parametrize("name,call,expected", CASES, ids=[c[0] for c in CASES])
def test_same_mistake_same_exception_class(name, call, expected):
    _, tv_err = _outcome(lambda: call(tv, _inputs()))
    _, mo_err = _outcome(lambda: call(maskops, _inputs()))
    got = {
        (True, True): "same",
        (False, True): "stricter",
        (True, False): "wider",
        (False, False): "ok",
    }[(tv_err is not None, mo_err is not None)]
    assert got == expected, f"expected {expected}, got torchvision {tv_err!r}, maskops {mo_err!r}"
    if mo_err is not None:
        assert isinstance(mo_err, (TypeError, ValueError)), repr(mo_err)
    if expected == "same":
        assert isinstance(mo_err, type(tv_err)), (
            f"maskops raised {type(mo_err).__mro__}, torchvision {type(tv_err).__name__}: {tv_err}"
        )


@pytest.mark.parametrize("name,call", TORCHVISION_CRASHES, ids=[c[0] for c in TORCHVISION_CRASHES])
def test_torchvision_crashes_are_value_errors(name, call):
    with pytest.raises(ValueError, match="spatial_scale|sampling_ratio|batch index"):
        call(maskops, _inputs())


def test_case_table_covers_the_ops():
    ops = {c[0].split(" ")[0] for c in CASES}
    assert {
        "roi_align",
        "RoIAlign",
        "MultiScaleRoIAlign",
        "nms",
        "batched_nms",
        "box_area",
        "box_iou",
        "clip_boxes",
        "remove_small_boxes",
        "paste_masks_in_image",
        "BoxCoder",
        "AnchorGenerator",
    } <= ops
    assert sum(c[2] == "same" for c in CASES) >= 100


def test_exception_classes_keep_maskops_kind_and_message():
    t = _inputs()
    with pytest.raises(ValueError, match=r"boxes given as a tensor must have shape \[K, 5\]") as e:
        maskops.roi_align(t["x"], t["rois"][:, :4], 7)
    assert isinstance(e.value, AssertionError) and not isinstance(e.value, TypeError)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]") as e:
        maskops.nms(torch.rand(4), torch.rand(3), 0.5)
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(TypeError, match="must have a floating dtype") as e:
        maskops.nms(t["boxes"].long(), t["scores"], 0.5)
    assert isinstance(e.value, RuntimeError)
    # Every combined class is a TypeError or a ValueError, and picklable by name.
    for cls in set(V._COMPAT.values()):
        assert issubclass(cls, (TypeError, ValueError))
        err = pickle.loads(pickle.dumps(cls("message")))
        assert type(err) is cls and str(err) == "message"


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation.*:UserWarning")
def test_quantized_inputs_are_refused():
    x = torch.quantize_per_tensor(torch.rand(1, 2, 8, 8), 0.1, 0, torch.quint8)
    rois = torch.quantize_per_tensor(torch.tensor([[0.0, 1, 1, 5, 5]]), 0.1, 0, torch.quint8)
    assert tv.roi_align(x, rois, 2).is_quantized  # torchvision has quantized kernels
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        maskops.roi_align(x, rois, 2)
    boxes = torch.quantize_per_tensor(torch.tensor([[0.0, 0, 5, 5]]), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match="boxes must have a floating dtype"):
        maskops.nms(boxes, torch.ones(1), 0.5)


def test_documented_value_differences(rng):
    # Half boxes: torchvision returns float32, maskops keeps the dtype (computed in float32).
    half = random_boxes(20, (50, 50), rng).half()
    assert tv.box_area(half).dtype == torch.float32
    assert maskops.box_area(half).dtype == torch.float16
    assert torch.equal(maskops.box_area(half), tv.box_area(half).half())
    assert maskops.box_iou(half, half).dtype == torch.float16
    # Zero union: NaN in torchvision, 0 in maskops.
    z = torch.zeros(1, 4)
    assert tv.box_iou(z, z).isnan().all() and maskops.box_iou(z, z).item() == 0.0
    # MultiScaleRoIAlign: torchvision keeps the scales of its first call, maskops infers them
    # for every call.
    feats = OrderedDict(
        [
            ("0", torch.rand(1, 2, 16, 16, generator=rng)),
            ("1", torch.rand(1, 2, 8, 8, generator=rng)),
        ]
    )
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 20.0]])]
    tv_pool, mo_pool = (
        tv.MultiScaleRoIAlign(["0", "1"], 2, 2),
        maskops.MultiScaleRoIAlign(["0", "1"], 2, 2),
    )
    for pool in (tv_pool, mo_pool):
        pool(feats, boxes, [(64, 64)])
        pool(feats, boxes, [(32, 32)])
    assert tv_pool.scales == [0.25, 0.125] and mo_pool.scales == [0.5, 0.25]


# ---- 2. integer boxes ----


def _int_boxes(n, dtype, g, hi=100):
    """Boxes with 0 <= x1 <= x2 < hi (in range for every integer dtype), some of zero size."""
    xy = torch.randint(0, hi // 2, (n, 2), generator=g)
    wh = torch.randint(0, hi // 2, (n, 2), generator=g)
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_box_area_of_integer_boxes(rng, dtype, device):
    boxes = _int_boxes(50, dtype, rng).to(device)
    got, expected = maskops.box_area(boxes), tv.box_area(boxes)
    assert got.dtype == expected.dtype and got.device == boxes.device
    assert torch.equal(got, expected)
    batched = boxes.reshape(5, 10, 4)
    assert torch.equal(maskops.box_area(batched), tv.box_area(batched))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "dtype1,dtype2",
    [(d, d) for d in INT_DTYPES]
    + [
        (torch.int8, torch.int64),
        (torch.uint8, torch.int16),
        (torch.int32, torch.float32),
        (torch.float64, torch.int16),
    ],
)
def test_box_iou_of_integer_boxes(rng, dtype1, dtype2, device):
    a = _int_boxes(30, dtype1, rng).to(device)
    b = _int_boxes(20, dtype2, rng).to(device)
    b[:3] = a[:3].to(dtype2)  # identical boxes, IoU 1 (or 0 / 0 for zero-area ones)
    got, expected = maskops.box_iou(a, b), tv.box_iou(a, b)
    assert got.dtype == expected.dtype and got.device == a.device
    nan = expected.isnan()  # torchvision's 0 / 0 where both boxes have zero area
    assert (got[nan] == 0).all()
    if dtype1 == dtype2 == torch.uint8:
        # torchvision subtracts uint8 corners in uint8: boxes that do not overlap wrap around
        # to a large "intersection" (a negative IoU). maskops gives 0 there.
        lt = torch.maximum(a[:, None, :2], b[None, :, :2]).int()
        rb = torch.minimum(a[:, None, 2:], b[None, :, 2:]).int()
        apart = (rb < lt).any(-1)
        assert apart.any() and (got[apart] == 0).all() and (expected[apart & ~nan] != 0).any()
        nan |= apart
    if got.dtype == torch.float32 and not (dtype1.is_floating_point or dtype2.is_floating_point):
        assert torch.equal(got[~nan], expected[~nan])  # integers until one division: exact
    else:
        torch.testing.assert_close(got[~nan], expected[~nan], rtol=1e-6, atol=1e-7)


def test_box_iou_of_narrow_integers_does_not_wrap_around():
    # torchvision subtracts int8 coordinates in int8 (200 wraps to -56): a documented difference.
    a = torch.tensor([[-100, -100, 100, 100]], dtype=torch.int8)
    assert maskops.box_iou(a, a).item() == 1.0
    assert maskops.box_area(a).item() == 40000


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_clip_and_remove_small_integer_boxes(rng, dtype, device):
    boxes = (_int_boxes(60, dtype, rng, hi=120)).to(device)
    got, expected = maskops.clip_boxes(boxes, (37, 45)), tv.clip_boxes_to_image(boxes, (37, 45))
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)
    # A bound past the dtype's range clips nothing (torchvision: RuntimeError from clamp).
    assert torch.equal(maskops.clip_boxes(boxes, (70000, 70000)), boxes.clamp(min=0))
    for min_size in (0, 1, 7.5, 30):
        got, expected = (
            maskops.remove_small_boxes(boxes, min_size),
            tv.remove_small_boxes(boxes, min_size),
        )
        assert got.dtype == expected.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize("device", devices())
def test_float_box_ops_still_match(rng, device):
    boxes = random_boxes(80, (60, 70), rng).to(device) - 5
    assert torch.equal(maskops.box_area(boxes), tv.box_area(boxes))
    torch.testing.assert_close(maskops.box_iou(boxes, boxes[:9]), tv.box_iou(boxes, boxes[:9]))
    assert torch.equal(maskops.clip_boxes(boxes, (50, 40)), tv.clip_boxes_to_image(boxes, (50, 40)))
    assert torch.equal(maskops.remove_small_boxes(boxes, 3.0), tv.remove_small_boxes(boxes, 3.0))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "dtype", INT_DTYPES + [torch.float16, torch.float32, torch.float64, torch.bool]
)
def test_batched_nms_of_no_boxes_any_dtype(dtype, device):
    boxes = torch.empty(0, 4, dtype=dtype, device=device)
    for scores, idxs in [
        (torch.empty(0, device=device), torch.empty(0, dtype=torch.int64, device=device)),
        (torch.empty(0, dtype=torch.int32, device=device), torch.empty(0, device=device)),
    ]:
        got = maskops.batched_nms(boxes, scores, idxs, 0.5)
        expected = tv.batched_nms(boxes, scores, idxs, 0.5)
        assert got.dtype == expected.dtype == torch.int64 and got.shape == expected.shape == (0,)
        assert got.device == boxes.device


def test_batched_nms_of_no_boxes_looks_at_nothing_else():
    # torchvision's own test calls batched_nms(empty, None, None, None).
    for boxes in (torch.empty(0, 4), torch.empty(0)):
        expected = tv.batched_nms(boxes, None, None, None)
        got = maskops.batched_nms(boxes, None, None, None)
        assert got.dtype == expected.dtype == torch.int64 and got.shape == expected.shape == (0,)
    with pytest.raises(TypeError, match="iou_threshold"):  # with boxes, every argument counts
        maskops.batched_nms(
            torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long), None
        )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", INT_DTYPES + [torch.float16, torch.bool])
def test_nms_of_no_boxes_any_dtype(dtype, device):
    """No boxes give no indices whatever the dtypes (torchvision's CUDA nms checks for empty
    boxes first; its CPU nms refuses non-float dtypes first). Integer boxes are refused with
    torchvision's RuntimeError as soon as there are some."""
    boxes = torch.empty(0, 4, dtype=dtype, device=device)
    for scores in (torch.empty(0, device=device), torch.empty(0, dtype=torch.int64, device=device)):
        got = maskops.nms(boxes, scores, 0.5)
        assert got.dtype == torch.int64 and got.shape == (0,) and got.device == boxes.device
        if device != "cpu":
            assert torch.equal(got, tv.nms(boxes, scores, 0.5))
    if dtype in INT_DTYPES:
        some = torch.zeros(3, 4, dtype=dtype, device=device)
        scores = torch.rand(3, device=device)
        with pytest.raises(RuntimeError):
            tv.nms(some, scores, 0.5)
        with pytest.raises(TypeError, match="boxes must have a floating dtype") as e:
            maskops.nms(some, scores, 0.5)
        assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("device", devices())
def test_paste_and_decode_take_integer_boxes(rng, device):
    masks = torch.rand(6, 1, 28, 28, generator=rng).to(device)
    boxes = _int_boxes(6, torch.int64, rng).to(device)
    torch.testing.assert_close(
        maskops.paste_masks_in_image(masks, boxes, (90, 80)),
        tv_paste(masks, boxes, (90, 80)),
        rtol=0,
        atol=1e-5,
    )
    codes = torch.randn(6, 8, generator=rng).to(device)
    coder = tv_det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(
        maskops.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(codes, boxes),
        coder.decode_single(codes, boxes),
    )


# ---- 3. torch.fx symbolic tracing ----


def _check_traced(module, *inputs, leaf_names=(), eager_module=None):
    """Traces ``module``, then compares the GraphModule with ``module`` itself (maskops' modules
    stay usable after tracing) or with ``eager_module``, an identical one: torchvision's
    MultiScaleRoIAlign keeps the Proxies of its scales after tracing, and one that was called
    before does not trace (its kept LevelMapper cannot go into a graph)."""
    gm = torch.fx.symbolic_trace(module)
    targets = {
        getattr(n.target, "__name__", str(n.target))
        for n in gm.graph.nodes
        if n.op == "call_function"
    }
    assert set(leaf_names) <= targets, targets
    eager = (eager_module or module)(*inputs)
    traced = gm(*inputs)
    for e, g in zip(
        eager if isinstance(eager, (list, tuple)) else [eager],
        traced if isinstance(traced, (list, tuple)) else [traced],
    ):
        assert torch.equal(e, g)
    return gm


def _feature_dict(rng, device="cpu"):
    return OrderedDict(
        (str(i), torch.randn(2, 4, 64 >> i, 80 >> i, generator=rng).to(device)) for i in range(4)
    )


@pytest.mark.parametrize("device", devices())
def test_fx_roi_align_module(rng, device):
    x = torch.randn(2, 4, 20, 20, generator=rng).to(device)
    boxes = [random_boxes(5, (80, 80), rng).to(device), random_boxes(3, (80, 80), rng).to(device)]
    _check_traced(
        maskops.RoIAlign((5, 4), 0.25, 2, aligned=True), x, boxes, leaf_names=["roi_align"]
    )

    class UserModule(torch.nn.Module):
        def forward(self, x, rois):
            return maskops.roi_align(x.relu(), rois, 3, spatial_scale=0.25, sampling_ratio=-1) * 2

    rois = torch.cat([torch.zeros(4, 1), random_boxes(4, (80, 80), rng)], dim=1).to(device)
    _check_traced(UserModule(), x, rois, leaf_names=["roi_align"])


@pytest.mark.parametrize("device", devices())
def test_fx_multiscale_module_like_torchvision(rng, device):
    feats = _feature_dict(rng, device)
    boxes = [
        random_boxes(9, (256, 320), rng).to(device),
        random_boxes(4, (256, 320), rng).to(device),
    ]
    shapes = [(256, 320), (250, 300)]
    for lib in (tv, maskops):  # torchvision's own module traces; so does maskops'
        pool = lib.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        gm = _check_traced(
            pool,
            feats,
            boxes,
            shapes,
            eager_module=(
                lib.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2) if lib is tv else None
            ),
        )
        if lib is maskops:
            torch.testing.assert_close(
                gm(feats, boxes, shapes),
                tv.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes),
            )
            assert all(isinstance(s, float) for s in pool.scales)  # no Proxy left behind

    class Wrapper(torch.nn.Module):  # the dict built inside forward, image sizes constant
        def __init__(self):
            super().__init__()
            self.pool = maskops.MultiScaleRoIAlign(["a", "b"], (3, 5), 0)

        def forward(self, a, b, boxes):
            return self.pool({"a": a, "b": b}, [boxes], [(256, 320)])

    _check_traced(
        Wrapper(), feats["0"][:1], feats["1"][:1], boxes[0], leaf_names=["multiscale_roi_align"]
    )
    # Other image sizes after tracing: the traced graph infers the scales again.
    gm = torch.fx.symbolic_trace(maskops.MultiScaleRoIAlign(["0", "1"], 7, 2))
    small = OrderedDict((k, v[..., ::2, ::2]) for k, v in list(feats.items())[:2])
    assert torch.equal(
        gm(small, boxes, [(128, 160)] * 2),
        maskops.MultiScaleRoIAlign(["0", "1"], 7, 2)(small, boxes, [(128, 160)] * 2),
    )


@pytest.mark.parametrize("device", devices())
def test_fx_user_module_with_box_ops(rng, device):
    from maskops import batched_nms, box_iou

    class Detect(torch.nn.Module):
        def forward(self, boxes, scores, labels):
            keep = maskops.nms(boxes, scores, 0.5)
            keep_c = batched_nms(boxes, scores, labels, 0.6)
            iou = box_iou(boxes[keep], boxes)
            area = maskops.box_area(boxes)
            small = maskops.remove_small_boxes(maskops.clip_boxes(boxes, (50, 60)), 2.0)
            return keep, keep_c, iou, area, small

    boxes = random_boxes(200, (60, 60), rng).to(device)
    scores = torch.rand(200, generator=rng).to(device)
    labels = torch.randint(0, 5, (200,), generator=rng).to(device)
    _check_traced(
        Detect(),
        boxes,
        scores,
        labels,
        leaf_names=[
            "nms",
            "batched_nms",
            "box_iou",
            "box_area",
            "clip_boxes",
            "remove_small_boxes",
        ],
    )


def test_fx_graph_module_can_be_retraced_and_validates(rng):
    gm = torch.fx.symbolic_trace(maskops.RoIAlign(2, 1.0, 2))
    gm2 = torch.fx.symbolic_trace(gm)  # a leaf stays a leaf
    x = torch.randn(1, 2, 8, 8, generator=rng)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    assert torch.equal(gm2(x, rois), maskops.roi_align(x, rois, 2, 1.0, 2))
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        gm2(x, rois[:, 1:])


@pytest.fixture(scope="module")
def patched_model():
    torch.manual_seed(0)
    with maskops.torchvision_patched():
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=320, max_size=480
        ).eval()
    return model


def test_fx_patched_torchvision_model_submodules(rng, patched_model):
    """torchvision's detection models as a whole do not trace (with torchvision's ops either);
    the sub-modules that trace with torchvision's ops trace on maskops' ops too."""
    heads = patched_model.roi_heads
    assert isinstance(heads.box_roi_pool, maskops.MultiScaleRoIAlign)  # built while patched
    feats = OrderedDict(
        (k, torch.randn(2, 256, 80 >> i, 120 >> i, generator=rng))
        for i, k in enumerate(["0", "1", "2", "3"])
    )
    feats["pool"] = torch.randn(2, 256, 5, 8, generator=rng)
    props = [random_boxes(40, (320, 480), rng), random_boxes(25, (320, 480), rng)]
    shapes = [(320, 480), (300, 470)]
    with torch.no_grad():
        for pool in (heads.box_roi_pool, heads.mask_roi_pool):
            _check_traced(pool, feats, props, shapes)
        gm = torch.fx.symbolic_trace(
            torch.nn.Sequential(heads.box_head, heads.box_predictor.cls_score)
        )
        pooled = heads.box_roi_pool(feats, props, shapes)
        assert torch.equal(gm(pooled), heads.box_predictor.cls_score(heads.box_head(pooled)))
        # A torchvision module built before patching traces through the patched pooling too.
        tv_pool = tv.MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
        expected = tv.MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)(feats, props, shapes)
        with maskops.torchvision_patched():
            gm = torch.fx.symbolic_trace(tv_pool)
            targets = {getattr(n.target, "__module__", "") for n in gm.graph.nodes}
            assert "maskops.patch" in targets
            got = gm(feats, props, shapes)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_patched_box_ops_keep_torchvisions_other_formats(rng):
    """Patched, torchvision's box_iou / box_area run maskops' for corner boxes and torchvision's
    own for the formats and batched boxes maskops does not take; torchvision functions built on
    them (generalized_box_iou calls box_area(..., fmt=...)) keep working."""
    a, b = random_boxes(12, (50, 50), rng), random_boxes(7, (50, 50), rng)
    expected = [
        tv.box_iou(a, b, fmt="cxcywh"),
        tv.box_area(a, fmt="xywh"),
        tv.box_iou(a[None], b[None]),
        tv.generalized_box_iou(a, b),
        tv.box_iou(a, b),
    ]
    with maskops.torchvision_patched():
        got = [
            tv.box_iou(a, b, fmt="cxcywh"),
            tv.box_area(a, fmt="xywh"),
            tv.box_iou(a[None], b[None]),
            tv.generalized_box_iou(a, b),
            torchvision.ops.boxes.box_iou(boxes1=a, boxes2=b),
        ]
        assert tv.box_iou.__wrapped__ is maskops.box_iou
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ---- 4. sampling_ratio limit ----


def test_sampling_ratio_limit_is_a_clear_value_error(rng):
    x = torch.randn(1, 2, 8, 8, generator=rng)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    limit = V.MAX_SAMPLING_RATIO
    assert limit == 1024
    maskops.roi_align(x, rois, 2, 1.0, limit)
    for bad in (limit + 1, 10**9, 2**63 - 1):
        with pytest.raises(ValueError, match=rf"sampling_ratio must be at most {limit}.*got {bad}"):
            maskops.roi_align(x, rois, 2, 1.0, bad)
        with pytest.raises(ValueError, match="sampling_ratio"):
            maskops.RoIAlign(2, 1.0, bad)
        with pytest.raises(ValueError, match="sampling_ratio"):
            maskops.MultiScaleRoIAlign(["0"], 2, bad)
        with pytest.raises(ValueError, match="sampling_ratio"):
            maskops.multiscale_roi_align([x], rois, 2, [1.0], bad)


@pytest.mark.parametrize("bad", [1025, 10**9])
def test_sampling_ratio_limit_in_cpp(bad):
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    ops = torch.ops.maskops
    calls = [
        lambda: ops.roi_align(x, rois, 1.0, 2, 2, bad, False),
        lambda: ops._roi_align_backward(
            torch.ones(1, 2, 2, 2), rois, 1.0, 2, 2, 1, 2, 8, 8, bad, False
        ),
        lambda: ops.multiscale_roi_align([x], rois, [1.0], 2, 2, bad, False, 224.0, 4.0, 0),
        lambda: ops._multiscale_roi_align_backward(
            torch.ones(1, 2, 2, 2), rois, [1.0], 2, 2, 1, 2, [8], [8], bad, False, 224.0, 4.0, 0
        ),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="sampling_ratio must be at most 1024"):
            call()
