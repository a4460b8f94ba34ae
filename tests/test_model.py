"""models/: parts against torchvision, the inference rewrites, training, options and CLIs.

Whole-model cases use a ResNet-18 backbone at a small resolution to stay fast; the
ResNet-50 comparisons with torchvision are in test_model_equivalence.py.
"""

import copy
import dataclasses
import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from models import STAGES, build_mask_rcnn, ops
from models.anchors import AnchorGenerator
from models.evaluation import compare_detections
from models.fuse import ConvAct, fold_batchnorms, fold_conv_bn
from models.testing.equivalence import compare_stages, record_stages

# Small images, and few proposals and detections: the heads' cost scales with them.
TINY = dict(
    min_size=128,
    max_size=192,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=100,
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=100,
    box_batch_size_per_image=64,
    box_detections_per_img=20,
)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(TINY)
    opts.update(kw)
    return build_mask_rcnn("resnet18", **opts)


def tiny_targets(g, sizes, n=2):
    out = []
    for h, w in sizes:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat(
            [xy, xy + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 6], dim=1
        )
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        out.append(
            {"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=g), "masks": masks}
        )
    return out


# ---- parts against torchvision ----


def test_anchors_match_torchvision():
    ours = AnchorGenerator()
    tv = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    shapes = [(84, 100), (42, 50), (21, 25), (11, 13), (6, 7)]
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    expected = tv(ImageList(torch.zeros(1, 3, 336, 400), [(330, 400)]), feats)[0]
    got, per_level = ours((336, 400), shapes, torch.float32, torch.device("cpu"))
    assert torch.equal(got, expected)
    assert per_level == [h * w * 3 for h, w in shapes]


def test_rpn_proposals_match_torchvision_filter_proposals(rng):
    from torchvision.models.detection.rpn import RegionProposalNetwork as TVRPN

    levels = [2000, 500, 120]
    n = 2
    anchors = [
        torch.cat(
            [
                xy := torch.rand(k, 2, generator=rng) * 300,
                xy + torch.rand(k, 2, generator=rng) * 100 + 1,
            ],
            1,
        )
        for k in levels
    ]
    logits = [torch.randn(n, k, generator=rng) for k in levels]
    deltas = [torch.randn(n, k, 4, generator=rng) * 0.3 for k in levels]
    sizes = [(300, 320), (280, 400)]
    tv = TVRPN(
        None,
        None,
        0.7,
        0.3,
        256,
        0.5,
        {"training": 0, "testing": 600},
        {"training": 0, "testing": 300},
        0.7,
    ).eval()
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    proposals = coder.decode(torch.cat(deltas, 1).reshape(-1, 4), [torch.cat(anchors)] * n)
    exp_boxes, exp_scores = tv.filter_proposals(
        proposals.view(n, -1, 4), torch.cat(logits, 1), sizes, levels
    )
    boxes, scores = ops.rpn_proposals(
        torch.cat(logits, 1),
        torch.cat(deltas, 1),
        torch.cat(anchors),
        sizes,
        600,
        300,
        0.7,
        0.0,
        1e-3,
        levels,
    )

    def by_score(b, s):  # equal scores (sigmoid can map two logits to one float) in any order
        rows = sorted(zip(s.tolist(), b.tolist()), key=lambda r: (-r[0], r[1]))
        return torch.tensor([r[1] for r in rows]), torch.tensor([r[0] for r in rows])

    for b, s, eb, es in zip(boxes, scores, exp_boxes, exp_scores):
        assert s.shape == es.shape
        assert torch.all(s[:-1] >= s[1:])
        for got, expected in zip(by_score(b, s), by_score(eb, es)):
            torch.testing.assert_close(got, expected)


def test_batched_nms_matches_torchvision_per_class_nms(rng):
    n = 3000  # > 1000 boxes: torchvision's per-class loop
    xy = torch.rand(n, 2, generator=rng) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=rng) * 60 + 1], 1)
    scores = torch.rand(n, generator=rng)
    scores[::7] = scores[1::7][: len(scores[::7])]  # some exact ties
    classes = torch.randint(0, 40, (n,), generator=rng)
    expected = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, classes, 0.5)
    assert torch.equal(
        ops.batched_nms(boxes, scores, classes, 0.5).sort().values, expected.sort().values
    )


def test_other_backbones_match_torchvision_layout():
    for name in ("resnet18", "resnet34"):
        tv = torchvision.models.detection.MaskRCNN(
            resnet_fpn_backbone(
                backbone_name=name, weights=None, trainable_layers=5, norm_layer=FrozenBatchNorm2d
            ),
            num_classes=5,
        )
        expected = {k: v.shape for k, v in tv.state_dict().items()}
        got = {k: v.shape for k, v in build_mask_rcnn(name, 5).state_dict().items()}
        assert got == expected, name


def test_trainable_layers_freeze_the_rest():
    body = tiny_model(trainable_layers=2).backbone.body
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    body = tiny_model(trainable_layers=5, trainable_bn=True).backbone.body
    assert all(p.requires_grad for p in body.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    with pytest.raises(ValueError, match="trainable_layers"):
        build_mask_rcnn("resnet18", trainable_layers=6)
    with pytest.raises(ValueError, match="backbone"):
        build_mask_rcnn("vgg16")


# ---- inference rewrites ----


@pytest.mark.parametrize("bn_type", ["frozen", "batchnorm"])
def test_fold_conv_bn_is_exact_up_to_rounding(rng, bn_type):
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=bn_type == "batchnorm")
    bn = FrozenBatchNorm2d(16) if bn_type == "frozen" else nn.BatchNorm2d(16).eval()
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).data = torch.randn(16, generator=rng)
    bn.running_var.data = torch.rand(16, generator=rng) + 0.1
    x = torch.randn(2, 8, 12, 12, generator=rng)
    with torch.no_grad():
        expected = bn(conv(x))
        got = fold_conv_bn(conv, bn)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_act_fusion_matches_separate_ops(rng):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 20, 20, generator=rng).contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 16, 20, 20, generator=rng)
    with torch.inference_mode():
        torch.testing.assert_close(ConvAct(conv, relu=True)(x), torch.relu(conv(x)))
        torch.testing.assert_close(
            ConvAct(conv, relu=True)(x, residual=res), torch.relu(conv(x) + res)
        )
        torch.testing.assert_close(ConvAct(conv, relu=False)(x, residual=res), conv(x) + res)


def test_fusion_leaves_unfoldable_norms_alone(rng):
    from models.backbone import ResNetBody
    from models.fuse import fuse_conv_relu

    body = ResNetBody(
        torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(8, c))
    ).eval()
    x = torch.rand(1, 3, 64, 64, generator=rng)
    with torch.no_grad():
        expected = body(x)
        assert fold_batchnorms(body) == 0 and fuse_conv_relu(body) == 0
        got = body(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])


def stage_report(model, tested_model, images, device="cpu"):
    """``tested_model`` against ``model`` stage by stage: ``model`` in float64 is the truth,
    in float32 the measure of rounding (models/testing/equivalence.py)."""
    truth = record_stages(copy.deepcopy(model).double(), [im.double() for im in images])
    spread = record_stages(model, images, forced_by=truth)
    tested = record_stages(
        tested_model, [im.to(device) for im in images], forced_by=truth.to(device)
    )
    return compare_stages(truth, spread, tested), tested


def test_optimize_for_inference_keeps_detections_and_goes_channels_last(rng):
    model = tiny_model(box_score_thresh=0.0).eval()
    images = [torch.rand(3, 120, 160, generator=rng), torch.rand(3, 100, 90, generator=rng)]
    fast = copy.deepcopy(model).optimize_for_inference()
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in fast.modules())
    with torch.inference_mode(), fast.record_stages(keep_outputs=True) as rec:
        fast(images)
    for f in rec.outputs["features"].values():
        assert f.is_contiguous(memory_format=torch.channels_last)
    report, _ = stage_report(model, fast, images)
    assert report.ok, report.summary()
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        fast.load_state_dict(tiny_model().state_dict())


def test_fast_inference_by_default_leaves_the_model_as_it_is(rng):
    model = tiny_model(box_score_thresh=0.0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.rand(3, 120, 160, generator=rng), torch.rand(3, 100, 90, generator=rng)]
    plain = copy.deepcopy(model)
    plain.fast_inference = False
    # Without gradients, eval-mode inference runs rewritten copies: fused, channels-last.
    with torch.inference_mode(), model.record_stages(keep_outputs=True) as rec:
        model(images)
    assert all(
        f.is_contiguous(memory_format=torch.channels_last) for f in rec.outputs["features"].values()
    )
    report, _ = stage_report(plain, model, images)
    assert report.ok, report.summary()
    # ... and the model itself is untouched: same modules, same state_dict.
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    # New weights are picked up; plain mode and gradients use the modules as they are.
    other = tiny_model(seed=5, box_score_thresh=0.0).eval()
    model.load_state_dict(other.state_dict())
    other.fast_inference = False
    with torch.inference_mode():
        a, b = model(images[:1])[0], other(images[:1])[0]
    assert len(a["boxes"]) == len(b["boxes"]) > 0
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0.05)
    with torch.enable_grad():
        assert model(images[:1])[0]["scores"].requires_grad  # eval with autograd: plain path
    # Training after inference trains the real modules.
    model.train()
    targets = tiny_targets(rng, [(120, 160)])
    loss = sum(model(images[:1], targets).values())
    loss.backward()
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad is not None


def _scores(model, image):
    with torch.inference_mode():
        return model([image])[0]["scores"]


@pytest.mark.parametrize("optimized", [False, True])
def test_inference_sees_weights_changed_every_way(rng, optimized):
    # The fast path's rewritten copy and the weights packed for oneDNN follow the weights:
    # replaced, assigned through .data, written in place; writes through .data after
    # clear_inference_cache(), as documented.
    image = torch.rand(3, 120, 160, generator=rng)
    model = tiny_model(box_score_thresh=0.0).eval()
    if optimized:
        model.optimize_for_inference()
    plain = copy.deepcopy(model)
    plain.fast_inference = False
    from models.fuse import _PrepackedWeight

    for m in plain.modules():  # the reference reorders per call: nothing cached
        if isinstance(m, _PrepackedWeight):
            m._prepacked = lambda w, pack: w

    def weight(mdl):
        return mdl.roi_heads.box_predictor.cls_score.weight

    def check():
        got, want = _scores(model, image), _scores(plain, image)
        assert got.shape == want.shape and got.numel() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    check()
    with torch.no_grad():
        for w in (weight(model), weight(plain)):
            w.mul_(0.5)  # in place, counted by torch
    check()
    new = torch.randn(weight(model).shape, generator=rng) * 0.1
    weight(model).data, weight(plain).data = new.clone(), new.clone()  # .data replaced
    check()
    for w in (weight(model), weight(plain)):
        w.data.mul_(-2.0)  # through .data: not counted
    model.clear_inference_cache()
    check()


def test_fast_inference_is_pure(rng, monkeypatch):
    # The fast path computes on the model's own modules: no copy of the model is made, the
    # modules and parameters stay the very same objects, each fused layer keeps its derived
    # weights outside the state_dict, and a weight changed in place (an op torch counts)
    # changes the next output.
    image = torch.rand(3, 120, 160, generator=rng)
    model = tiny_model(box_score_thresh=0.0).eval()
    plain = copy.deepcopy(model)
    plain.fast_inference = False
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def no_deepcopy(*args, **kwargs):
        raise AssertionError("inference deep-copied something")

    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)
    first = _scores(model, image)
    with torch.no_grad():
        second = model([image])[0]["scores"]
    assert dict(model.named_modules()) == modules  # (the same objects, compared by identity)
    assert all(a is b for a, b in zip(model.modules(), modules.values()))
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, _scores(plain, image), rtol=1e-4, atol=1e-5)
    # The derived weights: made by the layers that fuse, no parameter or buffer.
    fused = [m for m in model.modules() if "_derived_weights" in m.__dict__]
    assert model.backbone.body.conv1 in fused and model.roi_heads.box_head.fc6 in fused
    assert model.roi_heads.mask_predictor in fused and model.rpn.head in fused
    # Weights changed in place, under no_grad, by ops torch counts: seen by the next call,
    # in the backbone (a conv and a folded norm), the FPN and the heads.
    body, heads = model.backbone.body, model.roi_heads
    with torch.no_grad():
        for m in (model, plain):
            m.backbone.body.layer2[0].conv2.weight.mul_(1.5)
            m.backbone.body.layer2[0].bn2.running_var.add_(0.5)
            m.backbone.fpn.layer_blocks[0][0].weight.add_(0.01)
            m.roi_heads.box_head.fc6.weight.mul_(0.5)
            m.roi_heads.mask_predictor.conv5_mask.weight.mul_(2.0)
    assert body is model.backbone.body and heads is model.roi_heads
    with torch.inference_mode():
        changed, want = model([image])[0], plain([image])[0]
    assert not torch.equal(changed["scores"], first) or changed["scores"].shape != first.shape
    assert changed["scores"].shape == want["scores"].shape
    torch.testing.assert_close(changed["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(changed["boxes"], want["boxes"], rtol=0, atol=0.05)
    # Copies and pickles of a model that ran carry no derived weights.
    monkeypatch.undo()
    clone = copy.deepcopy(model)
    assert all(
        m.__dict__["_derived_weights"].value is None
        for m in clone.modules()
        if "_derived_weights" in m.__dict__
    )
    model.clear_inference_cache()
    assert not any("_derived_weights" in m.__dict__ for m in model.modules())


def test_model_built_under_inference_mode_runs_the_fast_path(rng):
    image = torch.rand(3, 120, 160, generator=rng)
    with torch.inference_mode():
        model = tiny_model(box_score_thresh=0.0).eval()
        plain = copy.deepcopy(model)
        plain.fast_inference = False
        got, want = model([image])[0], plain([image])[0]
    assert "_derived_weights" in model.backbone.body.conv1.__dict__  # the fast path ran
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)


# ---- modes and options ----


def test_training_returns_torchvision_loss_names_and_trains(rng):
    model = tiny_model(trainable_bn=True, trainable_layers=5).train()
    sizes = [(120, 160), (150, 110)]
    images = [torch.rand(3, h, w, generator=rng) for h, w in sizes]
    targets = tiny_targets(rng, sizes)
    targets[1] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 150, 110, dtype=torch.uint8),
    }  # no objects
    losses = model(images, targets)
    assert list(losses) == [
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    ]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head[0][0].weight.grad.abs().sum() > 0
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_training_rejects_degenerate_boxes(rng):
    model = tiny_model().train()
    t = tiny_targets(rng, [(100, 100)])
    t[0]["boxes"][0, 2] = t[0]["boxes"][0, 0]
    with pytest.raises(ValueError, match="positive width"):
        model([torch.rand(3, 100, 100, generator=rng)], t)


def test_no_detections_gives_empty_outputs(rng):
    model = tiny_model(box_score_thresh=1.0).eval()  # no probability exceeds 1
    with torch.inference_mode():
        out = model([torch.rand(3, 90, 130, generator=rng)])[0]
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert out["masks"].shape == (0, 1, 90, 130) and out["masks"].dtype == torch.bool


def test_float_masks_option_matches_bool_masks(rng):
    model = tiny_model(box_score_thresh=0.0).eval()
    image = [torch.rand(3, 100, 140, generator=rng)]
    with torch.inference_mode():
        binary = model(image)[0]["masks"]
        model.mask_threshold = None
        probs = model(image)[0]["masks"]
    assert probs.dtype == torch.float32 and probs.shape == binary.shape
    assert ((probs >= 0.5) == binary).float().mean() > 0.9999


def test_bfloat16_autocast_keeps_boxes_and_scores_float32(rng):
    model = tiny_model(box_score_thresh=0.0).eval().optimize_for_inference()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with model.record_stages(keep_outputs=True) as rec:
            out = model([torch.rand(3, 100, 140, generator=rng)])[0]
    assert rec.outputs["features"]["0"].dtype == torch.bfloat16
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    assert out["masks"].dtype == torch.bool and len(out["boxes"]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_keep_boxes_and_scores_float32(rng, dtype):
    model = tiny_model(box_score_thresh=0.0).optimize_for_inference(dtype=dtype)
    assert model.roi_heads.box_head.fc6.weight.dtype == dtype
    with torch.inference_mode(), model.record_stages(keep_outputs=True) as rec:
        out = model([torch.rand(3, 100, 140, generator=rng)])[0]
    assert rec.outputs["features"]["0"].dtype == dtype
    assert rec.outputs["proposals"][0][0].dtype == torch.float32
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    assert out["masks"].dtype == torch.bool and len(out["boxes"]) > 0
    with pytest.raises(ValueError, match="dtype"):
        tiny_model().optimize_for_inference(dtype=torch.int8)


def test_record_stages_times_every_stage(rng):
    model = tiny_model().eval()
    with torch.inference_mode(), model.record_stages() as rec:
        model([torch.rand(3, 100, 100, generator=rng)])
    assert list(rec.times) == list(STAGES)
    assert all(t > 0 for t in rec.times.values())
    assert model.recorder is None


def test_compare_detections_matches_by_content():
    ref = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.90001, 0.5]),
    }
    got = {
        "boxes": ref["boxes"][[1, 0, 2]] + 0.001,
        "labels": ref["labels"][[1, 0, 2]],
        "scores": ref["scores"][[1, 0, 2]],
    }
    d = compare_detections(ref, got)
    assert d.identical() and not d.in_order
    got["labels"] = torch.tensor([3, 1, 3])  # the best detection's class changed
    assert not compare_detections(ref, got).identical()
    # A 0.2 px wide sliver in place of another: only excused when slivers are allowed.
    sliver = {k: v.clone() for k, v in ref.items()}
    sliver["boxes"][1] = torch.tensor([5.0, 5, 5.2, 20])
    got = {k: v.clone() for k, v in sliver.items()}
    got["boxes"][1] = torch.tensor([6.0, 5, 6.2, 20])
    d = compare_detections(sliver, got)
    assert not d.identical() and d.identical(allow_slivers=1)


# ---- CLIs ----


@pytest.fixture
def image_file(tmp_path, rng):
    path = tmp_path / "img.png"
    torchvision.io.write_png(
        (torch.rand(3, 96, 128, generator=rng) * 255).to(torch.uint8), str(path)
    )
    return str(path)


CLI_MODEL = ["--backbone", "resnet18", "--min-size", "96", "--max-size", "128"]


def test_predict_cli(image_file, tmp_path, capsys):
    from tools import predict

    out = tmp_path / "pred.png"
    assert (
        predict.main(
            ["--image", image_file, "--out", str(out), "--score-thresh", "0.0"] + CLI_MODEL
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "random weights" in captured.err
    assert "detections with score >= 0.0" in captured.out
    drawn = torchvision.io.decode_image(str(out))
    assert drawn.shape == (3, 96, 128)


def test_trace_cli_json_and_stage_images(image_file, tmp_path, capsys):
    from tools import trace

    assert (
        trace.main(
            ["--image", image_file, "--json", "--save-dir", str(tmp_path / "st")] + CLI_MODEL
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["stage"][0] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[0]["output"] == "1 x 3 x 96 x 128"
    assert "x 256 x 7 x 7 (box)" in rows[3]["output"]
    assert all(r["ms"] > 0 for r in rows)
    saved = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert saved[0] == "1_input.png" and "3_proposals_top100.png" in saved
    assert saved[-1] == "6_masks.png"


def test_predict_and_trace_load_a_training_checkpoint(image_file, tmp_path, capsys):
    """--checkpoint rebuilds the model from the config a tools.train checkpoint holds and
    names detections with its class names; the detections equal the model's own."""
    from models.build import build_model
    from models.engine.checkpoint import save_checkpoint
    from models.visualize import read_image
    from tools import predict, trace

    from train_helpers import tiny_model as tiny_config_model

    cfg = dataclasses.replace(tiny_config_model(), box_score_thresh=0.0, min_size=96, max_size=128)
    torch.manual_seed(5)
    model = build_model(cfg).eval()
    names = ["__background__", "zebra-like", "quokka-ish", "axolotl-ish"]
    path = tmp_path / "best.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": {"model": cfg.to_dict()},
            "class_names": names,
            "epoch": 3,
        },
        path,
    )
    # The checkpoint's own sizes (96 / 128) apply unless --min-size / --max-size are given.
    assert (
        predict.main(
            [
                "--image",
                image_file,
                "--checkpoint",
                str(path),
                "--score-thresh",
                "0.0",
                "--no-optimize",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "random weights" not in out.err
    with torch.inference_mode():
        det = model([read_image(image_file)])[0]
    assert len(det["scores"]) > 0
    assert f"{len(det['scores'])} in all" in out.out
    lines = [ln for ln in out.out.splitlines() if ln.split(" ")[0] in names]
    assert len(lines) == len(det["scores"])
    for ln, label, score in zip(lines, det["labels"].tolist(), det["scores"].tolist()):
        assert ln.split()[0] == names[label] and abs(float(ln.split()[1]) - score) < 1e-3
    assert trace.main(["--image", image_file, "--checkpoint", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert "x 32 x 7 x 7 (box)" in rows[3]["output"]  # the checkpoint's 32-channel FPN
    assert rows[0]["output"] == "1 x 3 x 96 x 128"  # its sizes: the 96 x 128 image as it is
    assert (
        trace.main(
            [
                "--image",
                image_file,
                "--checkpoint",
                str(path),
                "--json",
                "--min-size",
                "192",
                "--max-size",
                "256",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows"][0]["output"] == "1 x 3 x 192 x 256"
    with pytest.raises(SystemExit):  # one source of weights at a time
        predict.main(["--image", image_file, "--checkpoint", str(path), "--weights", str(path)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt"):
        predict.main(["--image", image_file, "--checkpoint", str(bad)])


# ---- torch.export ----


def test_exported_program_gives_the_same_detections(tmp_path):
    from models.deploy import export_model

    g = torch.Generator().manual_seed(3)
    model = tiny_model(box_score_thresh=0.0).eval().optimize_for_inference()
    images = [torch.rand(3, 100, 140, generator=g) for _ in range(2)]
    program = export_model(model, images[:1])
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.inference_mode():
        for image in images:  # the example image and another of the same size
            expected, got = model([image])[0], loaded([image])[0]
            assert got["masks"].dtype == torch.bool and len(got["boxes"]) > 0
            d = compare_detections(expected, got)
            assert d.identical() and d.mask_agreement > 0.999, d.summary()


def test_exported_program_handles_no_detections():
    # maskops.nms's fake kernel allows 0 kept boxes (torchvision's declares at least 2).
    from models.deploy import export_model

    model = tiny_model(box_score_thresh=1.0).eval()  # nothing passes: empty outputs
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = export_model(model, [image]).module()([image])[0]
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 1, 64, 80)


# ---- CUDA ----


@pytest.mark.cuda
def test_cuda_matches_cpu(rng):
    # Judged stage by stage against the CPU model in float64 (TF32 is off in the tests).
    model = tiny_model(box_score_thresh=0.0).eval()
    images = [torch.rand(3, 120, 160, generator=rng)]
    report, tested = stage_report(model, copy.deepcopy(model).cuda(), images, "cuda")
    assert report.ok, report.summary()
    assert tested.final[0]["masks"].is_cuda and len(tested.final[0]["boxes"]) > 0
