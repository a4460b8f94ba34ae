"""Inference-only rewrites of the model: batch norms folded into the convolutions before
them, and each convolution fused with the ReLU / residual add after it (CPU, oneDNN)."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskops import cpu


def _is_bn(m) -> bool:
    return isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))


def conv_bn_pairs(module: nn.Module) -> List[Tuple[nn.Module, str, str]]:
    """``(parent, conv_name, bn_name)`` for each conv directly followed by a batch norm in a
    ResNet: the stem and blocks (``convK`` -> ``bnK``) and downsample branches
    (``Sequential(conv, bn)``)."""
    pairs = []
    for m in module.modules():
        for k in ("1", "2", "3"):
            conv, bn = getattr(m, "conv" + k, None), getattr(m, "bn" + k, None)
            if isinstance(conv, nn.Conv2d) and _is_bn(bn):
                pairs.append((m, "conv" + k, "bn" + k))
        if (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d)
                and _is_bn(m[1])):
            pairs.append((m, "0", "1"))
    return pairs


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Returns ``conv`` with ``bn`` (eval-mode statistics) folded into its weight and bias:
    ``bn(conv(x)) == conv'(x)``. The arithmetic is done in float64, then rounded once."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    dtype = conv.weight.dtype
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(bias.to(dtype=dtype, device=conv.weight.device),
                             requires_grad=conv.weight.requires_grad)
    return conv


def fold_batchnorms(module: nn.Module) -> int:
    """Folds every ResNet batch norm of ``module`` into its convolution and replaces the
    batch norm with ``nn.Identity``, in place. Returns the number folded.

    Inference only: a ``BatchNorm2d`` is folded with its running statistics (its eval-mode
    behaviour), and the state_dict afterwards has conv biases and no batch-norm entries.
    """
    pairs = conv_bn_pairs(module)
    for parent, conv_name, bn_name in pairs:
        fold_conv_bn(getattr(parent, conv_name) if not conv_name.isdigit() else parent[int(conv_name)],
                     getattr(parent, bn_name) if not bn_name.isdigit() else parent[int(bn_name)])
        if bn_name.isdigit():
            parent[int(bn_name)] = nn.Identity()
        else:
            setattr(parent, bn_name, nn.Identity())
    return len(pairs)


# ---- convolution + ReLU (+ residual add) in one oneDNN call (CPU inference) ----

def onednn_available() -> bool:
    """Whether this torch has oneDNN's fused convolution (``mkldnn._convolution_pointwise``)."""
    return hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class _PrepackedWeight:
    """Mixin: oneDNN's blocked copy of a weight, made on first use and kept.

    Given a plain weight, each oneDNN call reorders it into the blocked layout its kernel
    reads (for the bfloat16 model: ~40 ms a forward, 8 % of it). The copy is remade when the
    weight is replaced, moved, or written in place by an op that torch counts (its version
    counter; not for inference tensors, nor for writes through ``.data``: after those, call
    :func:`forget_packed_weights`). It is left out of copies and pickles, and is no parameter
    or buffer (state_dicts are unchanged). Inference holds both copies in memory.
    """

    def _prepacked(self, weight: torch.Tensor, pack) -> torch.Tensor:
        version = None if weight.is_inference() else weight._version
        key = (weight, weight.data_ptr(), version, weight.dtype, weight.shape)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0][0] is not weight or cached[0][1:] != key[1:]:
            with torch.no_grad():
                packed = pack(weight)
            # The weight's memory is held with the copy, so that no later weight can take
            # its address and pass for it.
            cached = (key, packed, weight.detach())
            self.__dict__["_packed"] = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def forget_packed_weights(module: nn.Module) -> int:
    """Drops the packed weight copies held in ``module`` and its children (they are remade
    on the next call); the number dropped. Needed only after writing weights through
    ``.data``, which torch's version counter does not see."""
    n = 0
    for m in module.modules():
        if m.__dict__.pop("_packed", None) is not None:
            n += 1
    return n


class ConvAct(_PrepackedWeight, nn.Module):
    """``act(conv(x) [+ residual])`` as one oneDNN convolution with fused post-ops on CPU.

    A separate ReLU or residual add re-reads and re-writes the whole activation; fused, it
    is applied to the convolution's output while it is still in cache. Falls back to the
    plain modules off-CPU, under autocast, and for dtypes oneDNN's fused path does not take.
    The weight is reordered for oneDNN once, for the first input's shape (another shape whose
    kernel wants another layout reorders it per call, as an unpacked weight would be).

    Args:
        conv: the (bias-folded) ``nn.Conv2d``; relu: apply ReLU at the end.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ConvAct needs explicit zero padding")
        self.conv = conv
        self.relu = relu
        self._args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def _fused(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
        if residual is not None:
            if torch.is_grad_enabled() and residual.requires_grad:
                return False  # the sum's gradient needs autograd
            if residual.dim() != 4 or residual.shape[2] * residual.shape[3] == 1:
                # torch 2.11's oneDNN sum convolution fails on a 1x1 output ("could not create
                # a memory") with a packed or channels-last weight; a map that small costs
                # nothing on the plain path.
                return False
        return _onednn_ok(x, self.conv.weight)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                overwrite_residual: bool = False) -> torch.Tensor:
        """``overwrite_residual``: the caller no longer needs ``residual`` (a tensor of its
        own), so the sum may be written into it: reading and writing the same memory costs
        less than writing a new tensor (~4 % of the backbone's time)."""
        if not self._fused(x, residual):
            y = self.conv(x)
            if residual is not None:
                y = y + residual
            return torch.relu(y) if self.relu else y
        padding, stride, dilation, groups = self._args
        b = self.conv.bias
        w = self._prepacked(self.conv.weight, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, padding, stride, dilation, groups, list(x.shape)))
        post = "relu" if self.relu else None
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, b, padding, stride, dilation, groups, post or "none", [], "")
        if overwrite_residual and _writable_output(self.conv, x, residual):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, w, b, padding, stride, dilation, groups, "add", 1.0, post, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, w, b, padding, stride, dilation, groups, "add", 1.0, post, [], "")

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _writable_output(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``residual`` can take ``conv(x)``'s output in place: its shape, dtype and
    channels-last layout (an inference tensor only inside inference mode)."""
    fmt = torch.channels_last
    if not (residual.dtype == x.dtype and x.dim() == 4 and x.is_contiguous(memory_format=fmt)
            and residual.is_contiguous(memory_format=fmt)
            and (torch.is_inference_mode_enabled() or not residual.is_inference())):
        return False
    size = [x.shape[0], conv.out_channels]
    for d in range(2):
        k = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
        size.append((x.shape[2 + d] + 2 * conv.padding[d] - k) // conv.stride[d] + 1)
    return list(residual.shape) == size


class FusedBlock(nn.Module):
    """A ResNet block (bottleneck or basic, batch norms folded) on :class:`ConvAct`:
    each conv with its ReLU, the last one with the residual add and ReLU. The sum is written
    into the shortcut's tensor when the block owns it: the projection's output, or the input
    when the caller says it no longer needs it (``overwrite_input``, see :class:`FusedLayer`)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        self.convs = nn.ModuleList([ConvAct(c, relu=True) for c in convs])
        self.downsample = _as_conv_act(block.downsample)

    def forward(self, x: torch.Tensor, overwrite_input: bool = False) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        own = overwrite_input or self.downsample is not None
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, residual=identity, overwrite_residual=own)


class FusedLayer(nn.Sequential):
    """A ResNet layer (``nn.Sequential`` of blocks, same children and keys) whose blocks after
    the first may write over their input: it is the previous block's output, which nothing
    outside the layer sees (a forward hook on an inner block sees it overwritten later)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, overwrite_input=i > 0) if isinstance(block, FusedBlock) else block(x)
        return x


def _as_conv_act(downsample):
    # The projection shortcut (1x1 conv, folded norm) on oneDNN's path too.
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], nn.Identity)):
        return ConvAct(downsample[0], relu=False)
    return downsample


def _norms_folded(block: nn.Module) -> bool:
    # Fusing skips the block's norm layers: only valid once they are folded (Identity).
    norms = [getattr(block, n) for n in ("bn1", "bn2", "bn3") if hasattr(block, n)]
    return bool(norms) and all(isinstance(m, nn.Identity) for m in norms)


def fuse_conv_relu(body: nn.Module) -> int:
    """Replaces, in place, the blocks of a batch-norm-folded ResNet body (``layer1`` to
    ``layer4``) with :class:`FusedBlock` and its stem's conv + ReLU with a :class:`ConvAct`.
    Blocks whose norms are not folded (e.g. GroupNorm) are left as they are. Returns the
    number of blocks fused (0 when oneDNN's fused convolution is unavailable)."""
    if not onednn_available():
        return 0
    n = 0
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(body, name)
        for i in range(len(layer)):
            if _norms_folded(layer[i]):
                layer[i] = FusedBlock(layer[i])
                n += 1
        if isinstance(layer, nn.Sequential) and not isinstance(layer, FusedLayer):
            setattr(body, name, FusedLayer(*layer))
    if _norms_folded(body):
        body.conv1 = ConvAct(body.conv1, relu=True)
        body.relu = nn.Identity()
    return n


def fpn_fusable(fpn: nn.Module) -> bool:
    """Whether :class:`FusedFPN` reproduces ``fpn``: convolutions only, LastLevelMaxPool."""
    blocks = list(fpn.inner_blocks) + list(fpn.layer_blocks)
    return (isinstance(fpn.extra_blocks, LastLevelMaxPool)
            and all(len(b) == 1 and isinstance(b[0], nn.Conv2d) for b in blocks))


class FusedFPN(nn.Module):
    """torchvision's ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``) computing each
    lateral 1x1 conv and its top-down sum in one fused call. Same parameters, same output."""

    def __init__(self, fpn: nn.Module) -> None:
        super().__init__()
        if not fpn_fusable(fpn):
            raise ValueError("FusedFPN reproduces an FPN of plain convolutions (no norm) with "
                             "LastLevelMaxPool only")
        self.inner = nn.ModuleList([ConvAct(b[0], relu=False) for b in fpn.inner_blocks])
        self.layer = nn.ModuleList([ConvAct(b[0], relu=False) for b in fpn.layer_blocks])

    def forward(self, x):
        names = list(x.keys())
        feats = list(x.values())
        last = self.inner[-1](feats[-1])
        results = [self.layer[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            top_down = F.interpolate(last, size=feats[i].shape[-2:], mode="nearest")
            last = self.inner[i](feats[i], residual=top_down, overwrite_residual=True)
            results.insert(0, self.layer[i](last))
        # LastLevelMaxPool: P6 subsamples P5 (a 1x1 max pool with stride 2).
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names + ["pool"], results))


def fuse_heads(conv_relu_blocks: nn.Sequential) -> None:
    """Replaces each ``Sequential(conv, ReLU)`` of ``conv_relu_blocks`` (the RPN head's conv,
    the mask head) with a :class:`ConvAct`, in place."""
    if not onednn_available():
        return
    for i, block in enumerate(conv_relu_blocks):
        if len(block) == 2 and isinstance(block[0], nn.Conv2d) and isinstance(block[1], nn.ReLU):
            conv_relu_blocks[i] = ConvAct(block[0], relu=True)


# ---- fully connected layers and the mask head's upsampling as oneDNN matmuls (CPU) ----

def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Tracing (torch.compile / export) first: it keeps the portable ops, and a size test on a
    # traced batch would be a data-dependent guard.
    if torch.compiler.is_compiling() or not onednn_available():
        return False
    # oneDNN's fused ops have no autograd: gradients take the plain modules.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (x.device.type == "cpu" and onednn_dtype(x.dtype) and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu") and not needs_grad and x.numel() > 0)


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused CPU ops take ``dtype`` here: float32 always; bfloat16 only on a
    CPU where oneDNN computes it natively (elsewhere its weight reorder raises; the plain
    modules then run bfloat16 on torch's portable kernels)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu.features().native_bf16)


def _pack_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])


class LinearAct(_PrepackedWeight, nn.Module):
    """``act(x @ weight.T + bias)`` as one oneDNN matmul with the ReLU fused (CPU inference).

    Takes the ``nn.Linear``'s own parameters (same state_dict keys). oneDNN's matmul rather
    than ``F.linear``: on AMD EPYC the latter's BLAS took 2.3-2.5x as long for the box head's
    ``fc6`` (1000 x 12544 x 1024), and the separate ReLU re-reads the output. Falls back to
    ``F.linear`` (+ ReLU) off-CPU, under autocast and with gradients. The weight is
    reordered for oneDNN once (for the first input's row count).
    """

    def __init__(self, linear: nn.Linear, relu: bool) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.relu = relu

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_ok(x, self.weight):
            w = self._prepacked(self.weight, lambda w: _pack_linear(w, x))
            return torch.ops.mkldnn._linear_pointwise(
                x, w, self.bias, "relu" if self.relu else "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


def fuse_linears(box_head: nn.Module, box_predictor: nn.Module) -> None:
    """The box head's ``fc6``/``fc7`` (+ ReLU) and the predictor's two layers as
    :class:`LinearAct`, in place."""
    if not onednn_available():
        return
    box_head.fc6 = LinearAct(box_head.fc6, relu=True)
    box_head.fc7 = LinearAct(box_head.fc7, relu=True)
    box_head.relu_fused = True
    box_predictor.cls_score = LinearAct(box_predictor.cls_score, relu=False)
    box_predictor.bbox_pred = LinearAct(box_predictor.bbox_pred, relu=False)


class MatmulMaskPredictor(_PrepackedWeight, nn.Module):
    """A :class:`~models.roi_heads.MaskPredictor` whose 2x2 stride-2 transposed convolution
    runs as one matmul (CPU inference).

    A 2x2 stride-2 transposed convolution writes each output pixel from exactly one input
    pixel: ``out[k, o, 2i+a, 2j+b] = sum_c x[k, c, i, j] * W[c, o, a, b] + bias[o]``. On
    channels-last features that is ``[K*H*W, C] @ [C, 4*O]``, columns ordered ``(a, b, o)``,
    with the ReLU fused; the per-RoI class logit is then a batched dot product over ``o``, and
    only the ``[K, 2H, 2W]`` logits are reordered. oneDNN's transposed convolution took ~9x as
    long per FLOP as the head's 3x3 convolutions. Same parameters, same output up to float
    rounding; falls back to the wrapped predictor where oneDNN's matmul does not apply.
    """

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        deconv = predictor.conv5_mask
        if (tuple(deconv.kernel_size) != (2, 2) or tuple(deconv.stride) != (2, 2)
                or tuple(deconv.padding) != (0, 0) or deconv.groups != 1
                or tuple(deconv.dilation) != (1, 1) or tuple(deconv.output_padding) != (0, 0)):
            raise ValueError("MatmulMaskPredictor needs a 2x2, stride-2 transposed convolution")
        self.predictor = predictor
        with torch.no_grad():
            w = deconv.weight  # [C, O, 2, 2]
            self.register_buffer("up_weight", w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).clone())
            b = deconv.bias if deconv.bias is not None else w.new_zeros(w.shape[1])
            self.register_buffer("up_bias", b.repeat(4).clone())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not _onednn_ok(x, self.up_weight):
            return self.predictor(x, labels)
        k, c, h, w = x.shape
        o = self.up_weight.shape[0] // 4
        rows = x.permute(0, 2, 3, 1).reshape(k * h * w, c)  # a view when x is channels-last
        up_weight = self._prepacked(self.up_weight, lambda w: _pack_linear(w, rows))
        up = torch.ops.mkldnn._linear_pointwise(rows, up_weight, self.up_bias, "relu", [], "")
        logits_conv = self.predictor.mask_fcn_logits
        cls_w = logits_conv.weight[:, :, 0, 0][labels].to(up.dtype)  # [K, O]
        cls_b = logits_conv.bias[labels].to(up.dtype)                 # [K]
        logits = torch.bmm(up.view(k, h * w * 4, o), cls_w[:, :, None]).view(k, h, w, 2, 2)
        logits = logits + cls_b[:, None, None, None, None]
        return logits.permute(0, 1, 3, 2, 4).reshape(k, 1, 2 * h, 2 * w)

    def all_classes(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.all_classes(x)


class PointwisePredictor(_PrepackedWeight, nn.Module):
    """The RPN head's two 1x1 convolutions (objectness ``A`` channels, deltas ``4A``) as one
    matmul over the channels-last shared features: the 256-channel map is read once instead
    of twice, and small-output 1x1 convolutions are slow in oneDNN. Returns per level the
    head's ``(logits [N, H*W*A], deltas [N, H*W*A, 4])``; ``None`` where it does not apply
    (the caller then runs the convolutions)."""

    def __init__(self, cls_logits: nn.Conv2d, bbox_pred: nn.Conv2d) -> None:
        super().__init__()
        with torch.no_grad():
            w = torch.cat([cls_logits.weight, bbox_pred.weight])[:, :, 0, 0].clone()
            b = torch.cat([cls_logits.bias, bbox_pred.bias]).clone()
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.num_anchors = cls_logits.out_channels

    def forward(self, t: torch.Tensor):
        if not (_onednn_ok(t, self.weight) and t.is_contiguous(memory_format=torch.channels_last)):
            return None
        n, c, h, w = t.shape
        a = self.num_anchors
        rows = t.permute(0, 2, 3, 1).reshape(n * h * w, c)
        weight = self._prepacked(self.weight, lambda w: _pack_linear(w, rows))
        y = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")
        return y[:, :a].reshape(n, -1), y[:, a:].reshape(n, -1, 4)


def fuse_rpn_predictors(rpn_head: nn.Module) -> None:
    """Gives the RPN head a :class:`PointwisePredictor`, in place."""
    if onednn_available():
        rpn_head.pointwise = PointwisePredictor(rpn_head.cls_logits, rpn_head.bbox_pred)
