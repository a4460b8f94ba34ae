"""Every branch that depends on the CPU (maskops.cpu), on any host.

Two seams make a branch run where the CPU would not take it: ``cpu.use_isa`` runs maskops'
kernels at a lower SIMD level than the CPU's (real code, real instructions), and
``cpu.pretend`` makes maskops decide as on a CPU without a feature (e.g. native bfloat16).
``make test-cpu-kinds`` runs these tests again on emulated CPUs (qemu-x86_64 -cpu Haswell:
AVX2 without AVX-512 or native bfloat16; -cpu Nehalem: no AVX), where the real answers are
the missing ones.
"""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision

import maskops
from maskops import cpu
from models.build import ModelConfig, build_model
from models.fuse import _onednn_ok

from helpers import in_layout, random_boxes, random_rois

pytestmark = pytest.mark.cpu_kinds

LEVELS = [
    lvl for lvl in cpu.ISAS if cpu.ISAS.index(lvl) <= cpu.ISAS.index(cpu.features().isa_supported)
]


def test_features_are_consistent():
    f = cpu.features()
    assert f.isa in cpu.ISAS and f.isa_supported in cpu.ISAS
    assert cpu.ISAS.index(f.isa) <= cpu.ISAS.index(f.isa_supported)
    assert f.torch_capability in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
    # Dot-product units only count where oneDNN computes the type at all.
    assert not f.fast_bf16 or f.native_bf16
    assert f.name and f.name in f.summary() and f.isa in f.summary()
    assert set(f.as_dict()) >= {"isa", "native_bf16", "fast_bf16", "amx", "torch_capability"}


def test_pretend_changes_the_answers_inside_only():
    before = cpu.features()
    with cpu.pretend(native_bf16=False, amx=False) as f:
        assert not f.native_bf16 and not f.fast_bf16 and not cpu.features().native_bf16
        with cpu.pretend(native_bf16=True, avx512_bf16=True):
            assert cpu.features().fast_bf16
        assert not cpu.features().native_bf16
    assert cpu.features() == before
    with pytest.raises(TypeError, match="no such CPU feature"):
        with cpu.pretend(avx1024=True):
            pass


LAYOUTS = [
    ("nchw", torch.float32),
    ("channels_last", torch.float32),
    ("channels_last", torch.bfloat16),
    ("nchw", torch.float64),
]


@pytest.mark.parametrize("level", LEVELS)
def test_every_kernel_level_matches_torchvision(level, rng):
    # The kernels' SIMD variants (AVX-512, AVX2, portable), each against torchvision: NMS in
    # float32 and float64, RoIAlign forward and backward in each layout's loops (NCHW planes
    # with the transposed store, channels-last tiles, bfloat16 read as stored).
    boxes = random_boxes(3000, (800, 800), rng)
    scores = torch.rand(3000, generator=rng)
    feats = torch.randn(2, 72, 40, 48, generator=rng)  # 72: a full and a partial channel block
    rois = random_rois(300, 2, (640, 768), rng, outside=True)
    grad = torch.randn(300, 72, 7, 7, generator=rng)
    got = []
    with cpu.use_isa(level) as now:
        assert now == level == cpu.isa() == cpu.features().isa
        keep = [
            maskops.nms(boxes.to(dt), scores.to(dt), 0.5) for dt in (torch.float32, torch.float64)
        ]
        for layout, dtype in LAYOUTS:
            x = (
                in_layout(feats.to(dtype), layout)
                .detach()
                .clone(memory_format=torch.preserve_format)
                .requires_grad_()
            )
            # (float32 boxes with bfloat16 features: bfloat16 coordinates lose whole pixels)
            box_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
            out = maskops.roi_align(x, rois.to(box_dtype), 7, 1 / 16, 2, True)
            out.backward(grad.to(dtype))
            got.append((out, x.grad))
    for k in keep:
        assert torch.equal(k, torchvision.ops.nms(boxes, scores, 0.5))
    for (layout, dtype), (out, dx) in zip(LAYOUTS, got):
        # float64 reference on the same (rounded) features and gradient
        x_tv = feats.to(dtype).double().requires_grad_()
        want = torchvision.ops.roi_align(x_tv, rois.double(), 7, 1 / 16, 2, True)
        want.backward(grad.to(dtype).double())
        tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.double(), want, **tol, msg=f"{layout} {dtype}")
        torch.testing.assert_close(dx.double(), x_tv.grad, **tol, msg=f"{layout} {dtype}")
    assert cpu.isa() == cpu.features().isa_supported or "MASKOPS_CPU_ISA" in os.environ


def test_a_level_above_the_cpu_is_clamped():
    with cpu.use_isa("avx512") as now:
        assert now == cpu.features().isa_supported
    with pytest.raises(ValueError, match="level must be one of"):
        with cpu.use_isa("sse9"):
            pass


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_the_environment_caps_the_kernels():
    run = _python("from maskops import cpu; print(cpu.isa())", MASKOPS_CPU_ISA="default")
    assert run.returncode == 0 and run.stdout.split()[-1] == "default", run.stderr
    bad = _python("import maskops.cpu", MASKOPS_CPU_ISA="avx3")
    assert bad.returncode != 0 and "MASKOPS_CPU_ISA must be one of" in bad.stderr


def test_onednn_cap_counts_as_no_native_half():
    # oneDNN capped below AVX-512 runs no native bfloat16 (whatever the CPU has).
    code = "from maskops import cpu; f = cpu.features(); print(f.native_bf16, f.fast_bf16)"
    run = _python(code, ONEDNN_MAX_CPU_ISA="AVX2")
    assert run.returncode == 0 and run.stdout.split()[-2:] == ["False", "False"], run.stderr


# ---- the dtype the model runs in ----


@pytest.mark.parametrize(
    "native,units,want",
    [(True, True, torch.bfloat16), (True, False, torch.float32), (False, False, torch.float32)],
)
def test_auto_dtype_takes_bfloat16_only_where_native_and_faster(native, units, want):
    with cpu.pretend(native_bf16=native, avx512_bf16=units, amx=False):
        assert cpu.inference_dtype("cpu") == want
        assert cpu.resolve_dtype("auto") == want
    assert cpu.resolve_dtype("bf16") == torch.bfloat16 and cpu.resolve_dtype("none") is None
    with pytest.raises(ValueError, match="dtype must be"):
        cpu.resolve_dtype("int8")


def test_fused_path_takes_bfloat16_only_where_native():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        with cpu.pretend(native_bf16=False):
            assert not _onednn_ok(x, w)
            assert _onednn_ok(x.float(), w.float())  # float32 is always oneDNN's
        if cpu.features().native_bf16:
            assert _onednn_ok(x, w)


def _slow_warnings(record):
    return [
        w
        for w in record
        if issubclass(w.category, RuntimeWarning) and "float32 is faster here" in str(w.message)
    ]


def _tiny():
    # Small enough for an emulated CPU (make test-cpu-kinds): narrow pyramid and heads, a
    # 96-pixel image, 20 detections.
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            backbone="resnet18",
            num_classes=5,
            fpn_channels=32,
            representation_size=64,
            mask_head_channels=16,
            mask_head_convs=1,
            min_size=96,
            max_size=96,
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=50,
            box_score_thresh=0.0,
            box_detections_per_img=20,
        )
    ).eval()


@pytest.fixture(scope="module")
def float32_detections():
    image = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(3))
    model = _tiny().optimize_for_inference()
    with torch.inference_mode():
        return image, model([image])[0]


def _agree(ref, got):
    # Same random-weight model, float32 vs bfloat16 weights (8-bit mantissas): the top
    # detections' boxes within a few pixels and their scores within a few hundredths.
    n = min(10, len(ref["boxes"]))
    assert len(got["boxes"]) > 0 and n > 0
    iou = torchvision.ops.box_iou(ref["boxes"][:n], got["boxes"])
    best = iou.max(dim=1).values
    assert (best > 0.8).float().mean() >= 0.8, best
    assert (got["scores"][:n] - ref["scores"][:n]).abs().max() < 0.05


@pytest.mark.parametrize("pretend_native", [False, None])
def test_bfloat16_model_runs_warns_once_and_agrees(float32_detections, pretend_native):
    # pretend_native=False: as on a CPU without native bfloat16; None: this CPU as it is
    # (under `make test-cpu-kinds`' Haswell, a real one without).
    image, ref = float32_detections
    seam = cpu.pretend(native_bf16=False) if pretend_native is False else cpu.pretend()
    with seam as f, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = _tiny().optimize_for_inference(dtype=torch.bfloat16)
        again = _tiny().optimize_for_inference(dtype=torch.bfloat16)
        with torch.inference_mode():
            got = model([image])[0]
            again([image])
    slow = _slow_warnings(record)
    if f.fast_bf16:
        assert slow == []
    else:
        assert len(slow) == 1, [str(w.message) for w in record]  # once per process
        assert "bfloat16" in str(slow[0].message)
        assert ("native" in str(slow[0].message)) == (not f.native_bf16)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert got["boxes"].dtype == torch.float32 and got["masks"].dtype == torch.bool
    _agree(ref, got)
    moved = dict(got, boxes=got["boxes"] + (got["boxes"][:, 2:] - got["boxes"][:, :2]).repeat(1, 2))
    with pytest.raises(AssertionError):  # the agreement check fails on boxes a width off
        _agree(ref, moved)
    if not f.native_bf16:  # nothing was packed for oneDNN
        assert not any("_packed" in m.__dict__ for m in model.modules())


def test_autocast_around_the_model_warns_once_where_slow(float32_detections):
    image, ref = float32_detections
    model = _tiny()
    with cpu.pretend(native_bf16=False), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model([image])[0]
            model([image])
    assert len(_slow_warnings(record)) == 1
    _agree(ref, got)


def test_command_line_amp_choices():
    import argparse

    from models.engine import autocast_dtype
    from tools._options import _half, autocast

    with cpu.pretend(native_bf16=False):
        a = argparse.Namespace(amp="auto", device="cpu", no_optimize=True)
        assert _half(a) is None and autocast_dtype("auto", torch.device("cpu")) is None
        with pytest.warns(RuntimeWarning, match="no native bfloat16"):
            assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        a.amp = "bf16"
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with autocast(a):
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert _slow_warnings(record) == []  # already warned in this process
    with cpu.pretend(native_bf16=True, avx512_bf16=True):
        assert autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="needs a GPU"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_check_prints_the_cpu_record():
    # (A subprocess: under qemu-user it runs on the host's CPU, so no answer is compared.)
    run = subprocess.run(
        [sys.executable, "-m", "maskops.check", "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MASKOPS_CPU_ISA": "avx2"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(
        r"^cpu: .*; maskops kernels: (avx2|default)(; | \(capped)", run.stdout, re.M
    ), run.stdout[:2000]
