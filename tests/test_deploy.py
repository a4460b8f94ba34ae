"""Deployment outside Python: every maskops op exported to ONNX (maskops.onnx) and run in
onnxruntime against the eager op on fresh random inputs, empty ones included; the model
exported to ONNX and as an AOTInductor package (models/export.py)."""

import pytest
import torch
from torch.export import Dim

import maskops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import maskops.onnx  # noqa: E402

DYN = Dim.DYNAMIC


def _export(module, args, tmp_path, dynamic_shapes=None, name="m"):
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(
        module.eval(),
        tuple(args),
        path,
        dynamo=True,
        verbose=False,
        dynamic_shapes=None if dynamic_shapes is None else (tuple(dynamic_shapes),),
        opset_version=maskops.onnx.OPSET,
        custom_translation_table=maskops.onnx.custom_translation_table(),
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(*inputs):
        names = [i.name for i in session.get_inputs()]
        feeds = {n: x.numpy() for n, x in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


def _boxes(n, size=100.0, gen=None, min_side=0.0):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + min_side
    return torch.cat([xy, xy + wh], 1)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_roi_align(tmp_path):
    g = torch.Generator().manual_seed(1)
    variants = [(a, sr) for a in (True, False) for sr in (2, 0)]  # sampling_ratio 0: adaptive

    def fn(x, rois):
        return tuple(
            maskops.roi_align(x, rois, (5, 4), spatial_scale=0.25, sampling_ratio=sr, aligned=a)
            for a, sr in variants
        )

    def rois(k):
        return torch.cat([torch.randint(0, 2, (k, 1), generator=g).float(), _boxes(k, 120.0, g)], 1)

    x = torch.randn(2, 3, 32, 40, generator=g)
    run = _export(
        _Fn(fn), (x, rois(6)), tmp_path, dynamic_shapes=({0: DYN, 2: DYN, 3: DYN}, {0: DYN})
    )
    for k in (17, 0):
        x = torch.randn(2, 3, 30, 33, generator=g)
        r = rois(k)
        if k:
            r[0, 1:] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # an empty box
        for got, want in zip(run(x, r), fn(x, r)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_multiscale_roi_align(tmp_path):
    g = torch.Generator().manual_seed(2)
    scales = [1 / 4, 1 / 8, 1 / 16]

    def fn(f0, f1, f2, rois):
        return maskops.multiscale_roi_align(
            [f0, f1, f2], rois, 7, spatial_scales=scales, sampling_ratio=2
        )

    def feats():
        return [torch.randn(2, 4, 64 // s, 64 // s, generator=g) for s in (1, 2, 4)]

    def rois(k):
        return torch.cat(
            [
                torch.randint(0, 2, (k, 1), generator=g).float(),
                _boxes(k, 256.0, g, min_side=1.0) * torch.tensor([1.0, 1, 2, 2]),
            ],
            1,
        )

    run = _export(_Fn(fn), (*feats(), rois(8)), tmp_path, dynamic_shapes=({}, {}, {}, {0: DYN}))
    for k in (40, 0):
        f, r = feats(), rois(k)
        torch.testing.assert_close(run(*f, r)[0], fn(*f, r), atol=1e-5, rtol=1e-5)


def _nms_inputs(n, g, classes=1):
    boxes = _boxes(n, 60.0, g, min_side=1.0)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, classes, (n,), generator=g) * 3 + 1  # sparse class ids
    return boxes, scores, idxs


NMS_OPTIONS = [{}, {"score_threshold": 0.4, "max_output": 7}]


def test_nms(tmp_path):
    g = torch.Generator().manual_seed(3)

    def fn(b, s):
        return tuple(maskops.nms(b, s, 0.5, **kw) for kw in NMS_OPTIONS)

    b, s, _ = _nms_inputs(50, g)
    run = _export(_Fn(fn), (b, s), tmp_path, dynamic_shapes=({0: DYN}, {0: DYN}))
    for n in (300, 1, 0):
        b, s, _ = _nms_inputs(n, g)
        for got, want in zip(run(b, s), fn(b, s)):
            assert torch.equal(got, want)


def test_batched_nms(tmp_path):
    g = torch.Generator().manual_seed(4)

    def fn(b, s, i):
        return tuple(maskops.batched_nms(b, s, i, 0.4, **kw) for kw in NMS_OPTIONS)

    run = _export(
        _Fn(fn), _nms_inputs(50, g, 5), tmp_path, dynamic_shapes=({0: DYN}, {0: DYN}, {0: DYN})
    )
    for n in (400, 1, 0):
        b, s, i = _nms_inputs(n, g, 7)
        for got, want in zip(run(b, s, i), fn(b, s, i)):
            assert torch.equal(got, want)


def test_boxes(tmp_path):
    """box_iou, decode_boxes, clip_boxes and remove_small_boxes in one graph."""
    g = torch.Generator().manual_seed(5)

    def fn(a, b, codes):
        iou = maskops.box_iou(a, b)
        dec = maskops.decode_boxes(codes, a, (10.0, 10.0, 5.0, 5.0))
        clipped = maskops.clip_boxes(dec, (50, 70))
        keep = maskops.remove_small_boxes(a, 8.0)
        return iou, dec, clipped, keep

    args = (_boxes(6, gen=g), _boxes(5, gen=g), torch.randn(6, 12, generator=g))
    run = _export(_Fn(fn), args, tmp_path, dynamic_shapes=({0: DYN}, {0: DYN}, {0: DYN}))
    for n, m in ((40, 30), (0, 3), (3, 0)):
        a, b = _boxes(n, gen=g), _boxes(m, gen=g)
        a[:1, 2:] = a[:1, :2]  # a zero-area box
        codes = torch.randn(n, 12, generator=g) * 3
        got, want = run(a, b, codes), fn(a, b, codes)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


def test_generate_anchors(tmp_path):
    def fn(f0, f1):
        return maskops.generate_anchors(
            [f0.shape[-2:], f1.shape[-2:]], [4, 8], [(32, 48), (64,)], (0.5, 1.0, 2.0), cache=False
        )

    args = (torch.zeros(1, 1, 12, 10), torch.zeros(1, 1, 6, 5))
    run = _export(_Fn(fn), args, tmp_path)
    assert torch.equal(run(*args)[0], fn(*args))


def test_paste_masks(tmp_path):
    g = torch.Generator().manual_seed(6)

    def fn(masks, boxes):
        return tuple(
            maskops.paste_masks(masks, boxes, (45, 60), threshold=t, padding=1) for t in (None, 0.5)
        )

    args = (torch.rand(3, 1, 14, 14, generator=g), _boxes(3, 50.0, g))
    run = _export(_Fn(fn), args, tmp_path, dynamic_shapes=({0: DYN}, {0: DYN}))
    for n in (9, 0):
        masks, boxes = torch.rand(n, 1, 14, 14, generator=g), _boxes(n, 70.0, g) - 5
        (prob, binary), (want_prob, want_binary) = run(masks, boxes), fn(masks, boxes)
        assert prob.dtype == torch.float32 and binary.dtype == torch.bool
        torch.testing.assert_close(prob, want_prob, atol=1e-5, rtol=1e-5)
        assert binary.shape == want_binary.shape == (n, 1, 45, 60)
        # A pixel may differ only where the probability is at the threshold.
        differ = binary != want_binary
        assert ((want_prob[differ] - 0.5).abs() < 1e-5).all()


def test_rpn_proposals(tmp_path):
    g = torch.Generator().manual_seed(7)
    levels = [48, 12]
    sizes = [(40, 50), (36, 44)]

    def fn(obj, deltas, anchors):
        boxes, scores = maskops.rpn_proposals(
            obj, deltas, anchors, sizes, 20, 15, 0.6, 0.0, 1e-3, levels
        )
        return (*boxes, *scores)

    def inputs():
        return (
            torch.randn(2, 60, generator=g),
            torch.randn(2, 60, 4, generator=g) * 0.5,
            _boxes(60, 50.0, g, min_side=2.0),
        )

    run = _export(_Fn(fn), inputs(), tmp_path)
    for _ in range(3):
        args = inputs()
        for x, y in zip(run(*args), fn(*args)):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


def test_unsupported_op_named(tmp_path):
    def fn(a, b):
        return maskops.encode_boxes(a, b, (1.0, 1.0, 1.0, 1.0))

    with pytest.raises(Exception, match="maskops.encode_boxes"):
        _export(_Fn(fn), (_boxes(4), _boxes(4)), tmp_path)


def test_import_maskops_does_not_import_onnxscript():
    import subprocess
    import sys

    code = "import sys, maskops; assert 'onnxscript' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_attribute_after_plain_import():
    """`maskops.onnx` loads on first access, with no `import maskops.onnx`."""
    import subprocess
    import sys

    code = (
        "import sys, maskops\n"
        "assert 'maskops.onnx' not in sys.modules\n"
        "assert maskops.onnx.OPSET == 18 and 'onnxscript' in sys.modules\n"
        "assert callable(maskops.onnx.custom_translation_table)\n"
        "assert not hasattr(maskops, 'no_such_name')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the model (models/export.py) ----


def _tiny_model(**kw):
    from models import build_mask_rcnn

    torch.manual_seed(0)
    opts = dict(
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=60,
        box_detections_per_img=15,
        box_score_thresh=0.0,
    )
    opts.update(kw)
    return build_mask_rcnn("resnet18", **opts).eval().optimize_for_inference()


def _same_detections(expected, got):
    from models.deploy import MASK_AGREEMENT
    from models.evaluation import compare_detections

    d = compare_detections(expected, got)  # boxes within 1e-2 px, scores within 1e-4
    assert d.identical() and (not d.pairs or d.mask_agreement >= MASK_AGREEMENT), d.summary()
    assert got["masks"].dtype == torch.bool and got["labels"].dtype == torch.int64


def _cli(tmp_path, *extra):
    """`python -m tools.export` arguments for a tiny ResNet-18 model and a fresh image."""
    import torchvision

    image = str(tmp_path / "img.png")
    g = torch.Generator().manual_seed(8)
    torchvision.io.write_png((torch.rand(3, 60, 80, generator=g) * 255).to(torch.uint8), image)
    return [
        "--image",
        image,
        "--backbone",
        "resnet18",
        "--min-size",
        "64",
        "--max-size",
        "96",
        *extra,
    ]


def test_model_onnx(tmp_path, capsys):
    """`--format onnx --check` (exit 0), the file on another image of the size, and the check
    failing on a detection moved by 1 px. Two classes: random weights then give scores
    ~0.5, above the default threshold 0.05, so there are detections to compare."""
    from tools import export

    args = _cli(tmp_path, "--num-classes", "2", "--format", "onnx")
    path = str(tmp_path / "m.onnx")
    assert export.main(args + ["--out", path, "--check"]) == 0
    assert " 0 matched" not in capsys.readouterr().out
    model = export.load_model(_parse(args))
    run = export.onnx_runner(path)
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = model([image])[0]
    assert len(expected["boxes"]) > 3
    _same_detections(expected, run(image))

    def moved(images):
        out = model(images)
        out[0]["boxes"][3, 0] += 1.0
        return out

    assert not export.check("onnx", moved, image, path, reps=1)


def _parse(args):
    import argparse

    from tools._options import add_model_args

    p = argparse.ArgumentParser()
    p.add_argument("--image")
    p.add_argument("--format")
    add_model_args(p)
    return p.parse_args(args)


@pytest.mark.slow
def test_model_onnx_no_detections(tmp_path, request):
    """91 classes and random weights: probabilities ~0.01, under the default threshold 0.05:
    no detections, empty outputs of the right shapes (a second model export: `-m slow`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("another model export (~30 s): run with -m slow")
    from tools import export

    out = str(tmp_path / "m.onnx")
    args = _cli(tmp_path, "--format", "onnx")
    assert export.main(args + ["--out", out, "--check"]) == 0
    got = export.onnx_runner(out)(export.read_image(args[1]))
    assert got["boxes"].shape == (0, 4) and got["masks"].shape == (0, 1, 60, 80)


def test_model_aoti(tmp_path):
    """AOTInductor package of the tiny model, loaded after `import maskops`. ~35 s on the
    2-core machine when quiet (most of it compiling the generated C++)."""
    from models.deploy import aoti_runner, export_aoti

    g = torch.Generator().manual_seed(9)
    model = _tiny_model()
    images = [torch.rand(3, 90, 120, generator=g) for _ in range(2)]
    path = export_aoti(model, images[0], str(tmp_path / "m.pt2"))
    run = aoti_runner(path)
    with torch.inference_mode():
        for image in images:
            _same_detections(model([image])[0], run(image))
