"""The inference rewrites of models/fuse.py that replace a layer's arithmetic by another
route (oneDNN matmuls): LinearAct, MatmulMaskPredictor and PointwisePredictor against the
layers they replace computed in float64, on fresh random inputs of several shapes, empty
inputs included, and their fallbacks (gradients, autocast, other dtypes); and the weights
they keep reordered for oneDNN (reused across input shapes, remade when the weight
changes, left out of copies, pickles and state_dicts)."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from models.fuse import (
    ConvAct,
    LinearAct,
    MatmulMaskPredictor,
    PointwisePredictor,
    fold_batchnorms,
    forget_packed_weights,
    fuse_conv_relu,
    onednn_available,
)
from models.roi_heads import MaskPredictor
from models.rpn import RPNHead

from helpers import FUSED_CASES, fused_case

pytestmark = [
    pytest.mark.skipif(not onednn_available(), reason="needs oneDNN's fused ops"),
    pytest.mark.cpu_kinds,
]

# float32 sums of a few hundred products against float64: ~1e-6 relative; bf16: ~1e-2.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _double(module):
    import copy

    return copy.deepcopy(module).double()


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize(
    "rows,cin,cout,relu",
    [(0, 16, 8, True), (1, 7, 3, False), (37, 300, 91, False), (200, 1024, 1024, True)],
)
def test_linear_act_matches_float64(case, rows, cin, cout, relu):
    with fused_case(case) as (dtype, onednn):
        _linear_act_matches_float64(dtype, onednn, rows, cin, cout, relu)


def _linear_act_matches_float64(dtype, onednn, rows, cin, cout, relu):
    g = torch.Generator().manual_seed(rows + cin)
    lin = torch.nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(cout, cin, generator=g) / cin**0.5)
        lin.bias.copy_(torch.randn(cout, generator=g))
    x = torch.randn(rows, cin, generator=g)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    ref = F.relu(ref) if relu else ref
    fused = LinearAct(lin, relu=relu).to(dtype)
    with torch.no_grad():
        got = fused(x.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, cout)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert ("_packed" in fused.__dict__) == (onednn and rows > 0)  # the path it took


def test_linear_act_keeps_the_linear_parameters_and_falls_back_with_gradients():
    lin = torch.nn.Linear(12, 5)
    fused = LinearAct(lin, relu=True)
    assert fused.weight is lin.weight and fused.bias is lin.bias
    assert set(fused.state_dict()) == {"weight", "bias"}
    assert (fused.in_features, fused.out_features) == (12, 5)
    x = torch.randn(9, 12, requires_grad=True)
    fused(x).sum().backward()  # oneDNN's op has no autograd: the fallback runs
    x2 = x.detach().clone().requires_grad_()
    F.relu(lin(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_fused_layers_give_weight_gradients_when_only_the_weight_needs_them():
    # An input without requires_grad (an image) still needs the autograd path in grad mode
    # when the weights train; the oneDNN ops would leave weight.grad empty.
    g = torch.Generator().manual_seed(14)
    lin = torch.nn.Linear(12, 5)
    conv = _conv(g, 4, 6, 3)
    fused_lin, fused_conv = LinearAct(lin, relu=False), ConvAct(conv, relu=False)
    x, img = torch.randn(9, 12, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    (fused_lin(x).sum() + fused_conv(img).sum()).backward()
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(5, 12))
    assert conv.weight.grad is not None and conv.bias.grad is not None
    torch.testing.assert_close(conv.bias.grad, torch.full((6,), 64.0))


def _mask_predictor(g, cin, dim, classes):
    mp = MaskPredictor(cin, dim, classes)
    with torch.no_grad():
        for p in mp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.1))
    return mp


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize(
    "k,cin,dim,classes,h,w",
    [
        (0, 16, 8, 5, 14, 14),
        (1, 8, 4, 3, 14, 14),
        (7, 32, 16, 11, 5, 9),
        (20, 256, 256, 91, 14, 14),
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_matmul_mask_predictor_matches_the_transposed_conv(
    case, k, cin, dim, classes, h, w, channels_last
):
    with fused_case(case) as (dtype, onednn):
        _matmul_mask_predictor_matches(dtype, onednn, k, cin, dim, classes, h, w, channels_last)


def _matmul_mask_predictor_matches(dtype, onednn, k, cin, dim, classes, h, w, channels_last):
    g = torch.Generator().manual_seed(k * 31 + cin)
    mp = _mask_predictor(g, cin, dim, classes)
    x = torch.randn(k, cin, h, w, generator=g)
    labels = torch.randint(0, classes, (k,), generator=g)
    # Reference: every class's map from the float64 transposed convolution, then each RoI's.
    ref = _double(mp).all_classes(x.double())[torch.arange(k), labels][:, None]
    fused = MatmulMaskPredictor(mp).to(dtype)
    xin = x.to(dtype)
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = fused(xin, labels)
    assert got.shape == (k, 1, 2 * h, 2 * w) and got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert ("_packed" in fused.__dict__) == (onednn and k > 0)


def test_matmul_mask_predictor_falls_back_and_refuses_other_upsamplings():
    g = torch.Generator().manual_seed(5)
    mp = _mask_predictor(g, 8, 4, 3)
    fused = MatmulMaskPredictor(mp)
    x = torch.randn(3, 8, 6, 6, generator=g, requires_grad=True)
    labels = torch.tensor([0, 2, 1])
    fused(x, labels).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    mp(x2, labels).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    mp.conv5_mask = torch.nn.ConvTranspose2d(8, 4, 3, 2)
    with pytest.raises(ValueError, match="2x2, stride-2"):
        MatmulMaskPredictor(mp)


@pytest.mark.parametrize("n,h,w", [(1, 25, 38), (2, 7, 5), (1, 1, 1)])
def test_pointwise_predictor_matches_the_two_convolutions(n, h, w):
    g = torch.Generator().manual_seed(n * 100 + h)
    head = RPNHead(64, 3)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    t = torch.relu(torch.randn(n, 64, h, w, generator=g))
    d = _double(head)
    ref_logits = d.cls_logits(t.double()).permute(0, 2, 3, 1).reshape(n, -1)
    ref_deltas = d.bbox_pred(t.double()).permute(0, 2, 3, 1).reshape(n, -1, 4)
    pw = PointwisePredictor(head.cls_logits, head.bbox_pred)
    with torch.no_grad():
        if h * w > 1:  # (a 1x1 map is channels-last as well)
            assert pw(t) is None  # not channels-last: the convolutions run instead
        logits, deltas = pw(t.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits.double(), ref_logits, **TOL[torch.float32])
    torch.testing.assert_close(deltas.double(), ref_deltas, **TOL[torch.float32])
    # The head with the predictor attached gives the same as without.
    feats = [torch.randn(n, 64, h, w, generator=g).contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        plain = head(feats)
        head.pointwise = pw
        fused = head(feats)
    torch.testing.assert_close(fused[0][0], plain[0][0], **TOL[torch.float32])
    torch.testing.assert_close(fused[1][0], plain[1][0], **TOL[torch.float32])


# ---- weights kept in oneDNN's layout ----


def _conv(g, cin, cout, k, stride=1):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * k * k) ** 0.5)
        conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


def _conv_ref(conv, x, residual=None, relu=True):
    y = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize(
    "cin,cout,k,stride", [(64, 256, 1, 1), (256, 64, 3, 1), (32, 48, 1, 2), (16, 16, 3, 2)]
)
def test_conv_act_packed_once_serves_every_input_shape(case, cin, cout, k, stride):
    with fused_case(case) as (dtype, onednn):
        _conv_act_packed_once(dtype, onednn, cin, cout, k, stride)


def _conv_act_packed_once(dtype, onednn, cin, cout, k, stride):
    # Packed for the first input's shape; later shapes (smaller, larger, other batch) may
    # want another layout and must still be right.
    g = torch.Generator().manual_seed(cin * 7 + k)
    conv = _conv(g, cin, cout, k, stride)
    fused = ConvAct(conv, relu=True).to(dtype).to(memory_format=torch.channels_last)
    for n, h, w in [(1, 40, 56), (1, 7, 5), (2, 64, 64), (1, 1, 1), (1, 40, 56)]:
        x = torch.randn(n, cin, h, w, generator=g).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        res = torch.randn(n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=g)
        res = res.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got, got_res = fused(x), fused(x, residual=res)
        ref32 = conv.to(dtype)  # the rounded weights the layer holds
        torch.testing.assert_close(got.double(), _conv_ref(ref32, x), **TOL[dtype])
        torch.testing.assert_close(got_res.double(), _conv_ref(ref32, x, res), **TOL[dtype])
    assert (fused.__dict__.get("_packed") is not None) == onednn  # the path it took


def test_packed_weights_follow_the_weights():
    g = torch.Generator().manual_seed(11)
    conv = _conv(g, 32, 64, 3)
    fused = ConvAct(conv, relu=False).to(memory_format=torch.channels_last)
    lin = LinearAct(torch.nn.Linear(300, 91), relu=False)
    x = torch.randn(1, 32, 20, 24, generator=g).contiguous(memory_format=torch.channels_last)
    rows = torch.randn(50, 300, generator=g)
    with torch.no_grad():
        fused(x), lin(rows)
        conv.weight.mul_(-2.0)  # written in place
        lin.weight.mul_(-2.0)
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(conv, x, relu=False), **TOL[torch.float32]
        )
        torch.testing.assert_close(
            lin(rows).double(),
            F.linear(rows.double(), lin.weight.double(), lin.bias.double()),
            **TOL[torch.float32],
        )
        conv.weight = torch.nn.Parameter(
            torch.randn(conv.weight.shape, generator=g) * 0.1
        )  # replaced
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(conv, x, relu=False), **TOL[torch.float32]
        )
        new = torch.randn(conv.weight.shape, generator=g) * 0.1
        conv.load_state_dict({"weight": new, "bias": conv.bias.detach().clone()})  # loaded
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(conv, x, relu=False), **TOL[torch.float32]
        )
        for _ in range(3):  # .data replaced, again and again (old memory may be reused)
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * 0.1
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.1
            torch.testing.assert_close(
                fused(x).double(), _conv_ref(conv, x, relu=False), **TOL[torch.float32]
            )
            torch.testing.assert_close(
                lin(rows).double(),
                F.linear(rows.double(), lin.weight.double(), lin.bias.double()),
                **TOL[torch.float32],
            )


def test_writes_through_data_need_forget_packed_weights():
    # torch does not count in-place writes through .data as changes (documented): the packed
    # copy is then the old weight until forget_packed_weights().
    g = torch.Generator().manual_seed(15)
    conv = _conv(g, 16, 16, 3)
    fused = ConvAct(conv, relu=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = fused(x)
        conv.weight.data.mul_(-1.0)
        assert torch.equal(fused(x), before)  # the stale copy, as documented
        assert forget_packed_weights(fused) == 1
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(conv, x, relu=False), **TOL[torch.float32]
        )


def test_packed_weights_stay_out_of_copies_pickles_and_state_dicts():
    g = torch.Generator().manual_seed(12)
    fused = ConvAct(_conv(g, 16, 32, 3), relu=True).to(memory_format=torch.channels_last)
    lin = LinearAct(torch.nn.Linear(64, 10), relu=True)
    x = torch.randn(1, 16, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    rows = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        want = fused(x), lin(rows)
    keys = set(fused.state_dict()), set(lin.state_dict())
    assert keys == ({"conv.weight", "conv.bias"}, {"weight", "bias"})
    buf = io.BytesIO()
    torch.save((fused, lin), buf)
    buf.seek(0)
    for f2, l2 in (
        copy.deepcopy((fused, lin)),
        pickle.loads(pickle.dumps((fused, lin))),
        torch.load(buf, weights_only=False),
    ):
        assert "_packed" not in f2.__dict__ and "_packed" not in l2.__dict__
        with torch.no_grad():
            assert torch.equal(f2(x), want[0]) and torch.equal(l2(rows), want[1])
    assert "_packed" in fused.__dict__  # the originals keep theirs
    compiled = LinearAct(torch.nn.Linear(4, 3), relu=True)
    compiled.compile()  # nn.Module drops its compiled wrapper from pickles; so do these
    assert "_compiled_call_impl" not in pickle.loads(pickle.dumps(compiled)).__dict__


def test_packed_weights_of_inference_tensors():
    # Copies made under inference_mode (as the model's fast path makes its rewritten parts)
    # have no version counter; replacing the weight is still seen.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 8, 10, 10, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv = _conv(g, 8, 16, 3)
        fused = copy.deepcopy(ConvAct(conv, relu=True)).to(memory_format=torch.channels_last)
        assert fused.conv.weight.is_inference()
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(fused.conv, x), **TOL[torch.float32]
        )
        fused.conv.weight = torch.nn.Parameter(-fused.conv.weight)
        torch.testing.assert_close(
            fused(x).double(), _conv_ref(fused.conv, x), **TOL[torch.float32]
        )


# ---- sums written into the residual's memory ----


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cin,cout,k,stride", [(16, 64, 1, 1), (32, 32, 3, 1), (16, 32, 1, 2)])
def test_conv_act_writes_the_sum_into_the_residual(case, cin, cout, k, stride):
    with fused_case(case) as (dtype, onednn):
        _conv_act_writes_the_sum(dtype, onednn, cin, cout, k, stride)


def _conv_act_writes_the_sum(dtype, onednn, cin, cout, k, stride):
    g = torch.Generator().manual_seed(cin + k + stride)
    conv = _conv(g, cin, cout, k, stride)
    fused = ConvAct(conv, relu=True).to(dtype).to(memory_format=torch.channels_last)
    cl = torch.channels_last
    x = torch.randn(2, cin, 17, 23, generator=g).to(dtype).contiguous(memory_format=cl)
    h, w = (17 - 1) // stride + 1, (23 - 1) // stride + 1
    res = torch.randn(2, cout, h, w, generator=g).to(dtype).contiguous(memory_format=cl)
    with torch.no_grad():
        want = fused(x, residual=res)
        mine = res.clone(memory_format=cl)
        got = fused(x, residual=mine, overwrite_residual=True)
    # Written in place on oneDNN's path (the portable path writes a new tensor).
    assert (got.data_ptr() == mine.data_ptr()) == onednn
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), _conv_ref(conv.to(dtype), x, res), **TOL[dtype])
    # Where it cannot take the output (layout, shape, an inference tensor outside inference
    # mode), the sum goes to a new tensor and the residual is left alone.
    with torch.inference_mode():
        frozen = res.clone(memory_format=cl)
    for other in (res.contiguous(), frozen):
        keep = other.clone()
        with torch.no_grad():
            got = fused(x, residual=other, overwrite_residual=True)
        assert got.data_ptr() != other.data_ptr() and torch.equal(other, keep)
        torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])


def test_fused_resnet_body_keeps_its_input_and_its_layer_outputs():
    # Blocks after the first write over the previous block's output; the body's input and
    # the layer outputs it returns (C2-C5) must stay as the unfused body computes them.
    import torchvision

    from models.backbone import ResNetBody

    g = torch.Generator().manual_seed(16)
    body = ResNetBody(torchvision.models.resnet50(weights=None)).eval()
    with torch.no_grad():
        for m in body.modules():  # non-trivial folded norms
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.rand(1, 3, 96, 128, generator=g).contiguous(memory_format=torch.channels_last)
    fused = copy.deepcopy(body)
    with torch.no_grad():
        want = copy.deepcopy(body).double()(x.double())
        plain = body(x)  # float32 as it was: the measure of rounding
        fold_batchnorms(fused)
        assert fuse_conv_relu(fused) == 16
        fused.to(memory_format=torch.channels_last)
        keep = x.clone()
        got = fused(x)
    assert torch.equal(x, keep)
    for key in want:
        spread = (plain[key].double() - want[key]).abs().max().item()
        err = (got[key].double() - want[key]).abs().max().item()
        assert err <= 4 * spread + 1e-6, (key, err, spread)


def test_fused_layer_leaves_its_input_and_the_fpn_its_inputs_alone():
    # resnet18's layer1 starts with a block without projection: its input is the shortcut,
    # which only later blocks (inputs made inside the layer) may write over. The FPN writes
    # its top-down sums into the upsampled maps, never into the C2-C5 it is given.
    import torchvision
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from models.backbone import ResNetBody
    from models.fuse import FusedFPN

    g = torch.Generator().manual_seed(17)
    cl = torch.channels_last
    body = ResNetBody(torchvision.models.resnet18(weights=None)).eval()
    fused = copy.deepcopy(body)
    with torch.no_grad():
        fold_batchnorms(fused)
        fuse_conv_relu(fused)
        fused.to(memory_format=cl)
        x = torch.rand(1, 64, 24, 32, generator=g).contiguous(memory_format=cl)
        keep = x.clone()
        got, want = fused.layer1(x), body.layer1(x)
        assert torch.equal(x, keep)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        fpn = FeaturePyramidNetwork([8, 16, 32], 16, extra_blocks=LastLevelMaxPool()).eval()
        feats = {
            str(i): torch.randn(1, c, s, s, generator=g).contiguous(memory_format=cl)
            for i, (c, s) in enumerate([(8, 32), (16, 16), (32, 8)])
        }
        kept = {k: v.clone() for k, v in feats.items()}
        out = FusedFPN(fpn).to(memory_format=cl)(feats)
        ref = fpn(kept)
    assert all(torch.equal(feats[k], kept[k]) for k in feats)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
