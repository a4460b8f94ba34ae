"""maskops.patch_torchvision(): torchvision's own Mask R-CNN, patched and unpatched, gives the
same detections, and the patched run really goes through maskops."""

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn

import maskops
from models.testing.equivalence import compare_stages, record_stages


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, min_size=320, max_size=480
    )
    return m.eval()


def _run(model, images):
    with torch.no_grad():
        return model(images)


def test_patched_model_matches_torchvision_stage_by_stage(model):
    # torchvision in float64 is the truth and in float32 the measure of rounding; the patched
    # model must stay within it at every stage (models/testing/equivalence.py).
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 300, 400, generator=g), torch.rand(3, 256, 256, generator=g)]
    expected = _run(model, images)
    truth = record_stages(copy.deepcopy(model).double(), [im.double() for im in images])
    spread = record_stages(model, images, forced_by=truth)
    assert not maskops.is_patched()
    with maskops.torchvision_patched():
        assert maskops.is_patched()
        assert torchvision.ops.boxes.batched_nms is maskops.batched_nms
        assert (
            torchvision.models.detection.transform.paste_masks_in_image
            is maskops.paste_masks_in_image
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            tested = record_stages(model, images, forced_by=truth)
        got = _run(model, images)
    names = {e.key for e in prof.key_averages()}
    assert {
        "maskops::multiscale_roi_align",
        "maskops::batched_nms",
        "maskops::paste_masks",
    } <= names
    assert not maskops.is_patched()
    assert torchvision.ops.boxes.batched_nms is not maskops.batched_nms
    for e, o, r in zip(expected, got, tested.final):
        assert len(e["boxes"]) > 0 and o["masks"].dtype == e["masks"].dtype
        assert all(torch.equal(o[k], r[k]) for k in o)  # the record is the patched forward
    report = compare_stages(truth, spread, tested)
    assert report.ok, report.summary()
    # After unpatching, torchvision runs its own ops again (same result as before).
    again = _run(model, images)
    assert torch.equal(again[0]["boxes"], expected[0]["boxes"])


def test_patch_is_idempotent_and_unpatch_restores():
    original = torchvision.ops.roi_align
    maskops.patch_torchvision()
    maskops.patch_torchvision()
    try:
        assert torchvision.ops.roi_align is maskops.roi_align
        assert torchvision.ops.MultiScaleRoIAlign is maskops.MultiScaleRoIAlign
    finally:
        maskops.unpatch_torchvision()
    assert torchvision.ops.roi_align is original
