"""models/ Mask R-CNN against torchvision's maskrcnn_resnet50_fpn with the same weights,
stage by stage (models/testing/equivalence.py).

Both models get torchvision's seeded random weights (``weights=None``; no download) and
``box_score_thresh=0.0`` so that every image has many detections. Random weights amplify
rounding, and oneDNN rounds differently on different CPUs, so nothing here compares last
bits or uses a tolerance fixed in advance: torchvision in float64 is the truth, torchvision
in float32 on this machine measures how far honest float32 rounding goes, and our model
must stay within a small factor of that at every stage, and may differ in a detection or
proposal only where it sits at a decision boundary. The injection tests show the check
fails on real differences.
"""

import copy
import dataclasses

import pytest
import torch
import torchvision

from models import build_mask_rcnn
from models.testing.equivalence import compare_stages, record_stages

torchvision_mask_rcnn = torchvision.models.detection.maskrcnn_resnet50_fpn

SMALL = dict(min_size=320, max_size=512)  # extra cases run at a reduced resolution


def seeded_torchvision(seed=0, **kw):
    torch.manual_seed(seed)
    return torchvision_mask_rcnn(weights=None, weights_backbone=None, **kw)


def ours_like(tv, **kw):
    model = build_mask_rcnn("resnet50", **kw)
    model.load_state_dict(tv.state_dict(), strict=True)
    return model


class References:
    """torchvision's records on some images: in float64 (the truth) and float32 (spread)."""

    def __init__(self, tv, images):
        self.images = images
        self.truth = record_stages(copy.deepcopy(tv).double(), [im.double() for im in images])
        self.spread = record_stages(tv, images, forced_by=self.truth)

    def record(self, model):
        return record_stages(model, self.images, forced_by=self.truth)

    def compare(self, tested):
        return compare_stages(self.truth, self.spread, tested)


def assert_equivalent(report):
    assert report.ok, "stages that differ:\n" + "\n".join(
        f"{c.stage}: {c.detail}" for c in report.failed()
    )


def assert_output_types(got, image):
    assert got["boxes"].dtype == torch.float32 and got["scores"].dtype == torch.float32
    assert got["labels"].dtype == torch.int64
    assert got["masks"].dtype == torch.bool
    assert got["masks"].shape == (len(got["boxes"]), 1, *image.shape[-2:])


@pytest.fixture(scope="module")
def full_size():
    """torchvision's references on one 800x800 image (default sizes: not resized), and our
    model with its weights."""
    tv = seeded_torchvision(box_score_thresh=0.0).eval()
    ours = ours_like(tv, box_score_thresh=0.0).eval()
    image = torch.rand(3, 800, 800, generator=torch.Generator().manual_seed(11))
    return References(tv, [image]), ours


def test_optimized_model_matches_torchvision_stage_by_stage(full_size):
    # What inference runs: folded batch norms, fused convolutions, channels-last
    # activations, reordered fc6; at torchvision's default image size.
    refs, ours = full_size
    fast = copy.deepcopy(ours).optimize_for_inference()
    tested = refs.record(fast)
    with torch.inference_mode():
        direct = fast(refs.images)[0]
    # The record is the model's own forward, stage by stage.
    for key, value in direct.items():
        assert torch.equal(value, tested.final[0][key]), key
    assert_output_types(direct, refs.images[0])
    assert len(direct["boxes"]) == 100
    assert_equivalent(refs.compare(tested))


@pytest.fixture(scope="module")
def reduced_resolution():
    tv = seeded_torchvision(seed=1, box_score_thresh=0.0, **SMALL).eval()
    return tv, ours_like(tv, box_score_thresh=0.0, **SMALL).eval()


@pytest.fixture(scope="module")
def batch_of_two(reduced_resolution):
    tv, ours = reduced_resolution
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) for h, w in [(480, 640), (300, 400)]]
    return References(tv, images), ours


@pytest.fixture(scope="module")
def ours_on_two(batch_of_two):
    refs, ours = batch_of_two
    return refs, ours, refs.record(ours)


def test_batch_of_two_images_matches_torchvision_stage_by_stage(ours_on_two):
    refs, ours, tested = ours_on_two
    with torch.inference_mode():
        direct = ours(refs.images)
    for image, got, recorded in zip(refs.images, direct, tested.final):
        assert_output_types(got, image)
        for key, value in got.items():
            assert torch.equal(value, recorded[key]), key
    report = refs.compare(tested)
    assert_equivalent(report)
    # Every stage of both images was judged, and the float32 reference passes its own checks.
    stages = {c.stage.split(",")[0] for c in report.checks}
    assert {
        "transform: batch",
        "backbone: stem",
        "backbone: layer1.0",
        "backbone: layer4.2",
        "backbone: level 0",
        "rpn head: objectness",
        "rpn: proposals",
        "rpn: proposals (float32 reference)",
        "box head: class_logits",
        "box head: detections",
        "box head: detections (float32 reference)",
        "mask head: logits",
        "paste: masks",
    } <= stages
    assert sum(c.stage.endswith("image 1") for c in report.checks) >= 7


# ---- the check fails on real differences ----


def edited(record, image, **changes):
    """A copy of ``record`` with image ``image``'s detection 0 (the best) edited."""
    rec = copy.deepcopy(record)
    det, final = rec.detections[image], rec.final[image]
    for key, fn in changes.items():
        if key == "masks":
            final["masks"] = fn(final["masks"])
        else:
            det[key] = fn(det[key])
    return rec


def failed_stages(report):
    return {c.stage.split(",")[0] for c in report.failed()}


def shift_first(boxes, px=1.0):
    boxes = boxes.clone()
    boxes[0] += px
    return boxes


def test_check_fails_on_a_shifted_box(ours_on_two):
    refs, _, tested = ours_on_two
    report = refs.compare(edited(tested, 0, boxes=shift_first))
    assert failed_stages(report) == {"box head: detections"}, report.summary()


def test_check_fails_on_a_wrong_class(ours_on_two):
    refs, _, tested = ours_on_two

    def relabel(labels):
        labels = labels.clone()
        labels[0] = labels[0] % 90 + 1
        return labels

    report = refs.compare(edited(tested, 1, labels=relabel))
    assert "box head: detections" in failed_stages(report), report.summary()


def test_check_fails_on_a_lost_detection(ours_on_two):
    refs, _, tested = ours_on_two
    rec = copy.deepcopy(tested)
    rec.detections[0] = {k: v[1:] for k, v in rec.detections[0].items()}  # drop the best
    report = refs.compare(rec)
    assert failed_stages(report) >= {"box head: detections"}, report.summary()
    assert any("robustly kept but lost: 1" in c.detail for c in report.failed())


def test_check_fails_on_a_shifted_mask(ours_on_two):
    refs, _, tested = ours_on_two
    report = refs.compare(edited(tested, 0, masks=lambda m: m.roll(1, dims=-1)))
    assert failed_stages(report) == {"paste: masks"}, report.summary()


@pytest.fixture(scope="module")
def wrong_weight(ours_on_two):
    """The record of our model with one output channel of one convolution 1 % off."""
    refs, ours, _ = ours_on_two
    bad = copy.deepcopy(ours)
    with torch.no_grad():
        bad.backbone.body.layer2[0].conv1.weight[3] *= 1.01
    return refs, refs.record(bad)


def assert_caught_in_its_block(report, margin):
    # Failed in the block that has the wrong weight, by ``margin`` times the bound at least,
    # and in no other part of the backbone body (each is run on the truth's input to it).
    check = report.check("backbone: layer2.0")
    assert not check.ok and check.error >= margin * check.bound, report.summary()
    parts = {
        s for s in failed_stages(report) if s.startswith(("backbone: layer", "backbone: stem"))
    }
    assert parts == {"backbone: layer2.0"}, report.summary()


def test_check_fails_on_a_slightly_wrong_weight(wrong_weight):
    # A real bug, far above rounding: 370x-470x the float32 reference's error in that
    # block, 22x-27x the bound, measured with AVX-512, AVX2 and scalar numerics. (Over the
    # whole backbone it is only 11x-31x the reference's error: see models/testing/equivalence.py.)
    refs, bad = wrong_weight
    assert_caught_in_its_block(refs.compare(bad), margin=8)


# Each stage run on the truth's inputs (StageRecord.forced) and the truth's record field
# it is compared with.
FORCED_TRUTH = dict(
    body="body",
    features="features",
    objectness="objectness",
    rpn_deltas="rpn_deltas",
    class_logits="class_logits",
    box_regression="box_regression",
    mask_logits="mask_logits",
)


def inflated(spread, truth, k):
    """``spread`` with the error of each of its stages run on the truth's inputs ``k`` times
    larger: the float32 reference of a CPU that rounds worse."""

    def scale(s, t):
        if isinstance(s, list):
            return [scale(a, b) for a, b in zip(s, t)]
        return t.double() + k * (s.double() - t.double())

    forced = dict(spread.forced)
    for key, name in FORCED_TRUTH.items():
        forced[key] = scale(spread.forced[key], getattr(truth, name))
    return dataclasses.replace(spread, forced=forced)


def test_check_fails_on_a_slightly_wrong_weight_where_rounding_is_larger(wrong_weight):
    # An AVX2-only AMD Zen 1 rounded so much worse than AVX-512 CPUs (the float32
    # reference's error at backbone level 1: 0.000369) that the whole backbone's check let
    # this bug through (0.0053 under a bound of 0.00604). Here every stage's rounding is
    # scaled to that size, on whatever CPU runs this (the whole backbone passes the bug
    # again): its own block still fails it, by 12x-33x the bound as measured.
    refs, bad = wrong_weight
    truth = refs.truth
    level1 = (refs.spread.forced["features"][1].double() - truth.features[1]).abs().max()
    spread = inflated(refs.spread, truth, 0.000369 / float(level1))
    assert_caught_in_its_block(compare_stages(truth, spread, bad), margin=4)


def test_check_fails_on_a_misaligned_roi_pool(ours_on_two):
    # RoIAlign with a half-pixel offset torchvision's model does not have: the box head
    # sees features shifted by half a cell.
    refs, ours, _ = ours_on_two
    bad = copy.deepcopy(ours)
    bad.roi_heads.box_roi_pool.aligned = True
    report = refs.compare(refs.record(bad))
    assert "box head: class_logits" in failed_stages(report), report.summary()
    assert "backbone: level 0" not in failed_stages(report)


# ---- training and state dicts ----


def test_training_losses_match_torchvision():
    # Fewer training proposals than the defaults (in both models) keep this fast.
    kw = dict(
        min_size=224,
        max_size=288,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        box_batch_size_per_image=128,
    )
    tv = seeded_torchvision(seed=2, **kw).train()
    # trainable_bn: torchvision's weights=None model trains its batch norms.
    ours = ours_like(tv, trainable_bn=True, trainable_layers=5, **kw).train()
    g = torch.Generator().manual_seed(5)

    def target(h, w, n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat(
            [xy, xy + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35]) + 8], dim=1
        )
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1 + 2 : y2 - 1, x1 + 1 : x2 - 2] = 1
        return {"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=g), "masks": masks}

    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 288, 224, generator=g)]
    targets = [target(240, 320, 3), target(288, 224, 2)]
    # Same RNG state before each forward: both draw the same scale and sample the same
    # anchors and proposals (the samplers use torch's RNG in the same order).
    torch.manual_seed(123)
    expected = tv(images, copy.deepcopy(targets))
    torch.manual_seed(123)
    losses = ours(images, copy.deepcopy(targets))
    assert list(losses) == list(expected)
    for name in expected:
        torch.testing.assert_close(
            losses[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def test_state_dict_keys_and_shapes_match_torchvision():
    tv = seeded_torchvision()  # weights=None: trainable BatchNorm2d backbone
    expected = {k: v.shape for k, v in tv.state_dict().items()}
    got = {
        k: v.shape for k, v in build_mask_rcnn("resnet50", trainable_bn=True).state_dict().items()
    }
    assert got == expected
    # The default (FrozenBatchNorm2d) layout is that of torchvision's COCO checkpoint.
    frozen = {k: v.shape for k, v in build_mask_rcnn("resnet50").state_dict().items()}
    assert frozen == {k: s for k, s in expected.items() if not k.endswith("num_batches_tracked")}


def test_state_dict_round_trip_through_files(tmp_path):
    tv = seeded_torchvision(seed=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = build_mask_rcnn("resnet50", weights=str(tmp_path / "tv.pth"))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k

    # ... and back: ours saved, loaded into a fresh torchvision model (strict).
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    fresh = seeded_torchvision(seed=4)
    fresh.load_state_dict(torch.load(tmp_path / "ours.pth", weights_only=True), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
