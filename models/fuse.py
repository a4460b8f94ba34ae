"""Inference-only rewrites of the model: batch norms folded into the convolutions before
them, and each convolution fused with the ReLU / residual add after it (CPU, oneDNN)."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


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

def _onednn_available() -> bool:
    return hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvAct(nn.Module):
    """``act(conv(x) [+ residual])`` as one oneDNN convolution with fused post-ops on CPU.

    A separate ReLU or residual add re-reads and re-writes the whole activation; fused, it
    is applied to the convolution's output while it is still in cache. Falls back to the
    plain modules off-CPU, under autocast, and for dtypes oneDNN's fused path does not take.

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

    def _fused(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.dtype == self.conv.weight.dtype and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and not x.requires_grad)

    def forward(self, x: torch.Tensor, residual: torch.Tensor = None) -> torch.Tensor:
        if not self._fused(x):
            y = self.conv(x)
            if residual is not None:
                y = y + residual
            return torch.relu(y) if self.relu else y
        padding, stride, dilation, groups = self._args
        w, b = self.conv.weight, self.conv.bias
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, b, padding, stride, dilation, groups, "relu" if self.relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, w, b, padding, stride, dilation, groups, "add", 1.0,
            "relu" if self.relu else None, [], "")

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FusedBlock(nn.Module):
    """A ResNet block (bottleneck or basic, batch norms folded) on :class:`ConvAct`:
    each conv with its ReLU, the last one with the residual add and ReLU."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        self.convs = nn.ModuleList([ConvAct(c, relu=True) for c in convs])
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, residual=identity)


def fuse_conv_relu(body: nn.Module) -> int:
    """Replaces, in place, the blocks of a batch-norm-folded ResNet body (``layer1`` to
    ``layer4``) with :class:`FusedBlock` and its stem's conv + ReLU with a :class:`ConvAct`.
    Returns the number of blocks fused (0 when oneDNN's fused convolution is unavailable)."""
    if not _onednn_available():
        return 0
    if any(_is_bn(m) for m in body.modules()):
        raise ValueError("fold the batch norms first (fold_batchnorms)")
    n = 0
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(body, name)
        for i in range(len(layer)):
            layer[i] = FusedBlock(layer[i])
            n += 1
    body.conv1 = ConvAct(body.conv1, relu=True)
    body.relu = nn.Identity()
    return n


class FusedFPN(nn.Module):
    """torchvision's ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``) computing each
    lateral 1x1 conv and its top-down sum in one fused call. Same parameters, same output."""

    def __init__(self, fpn: nn.Module) -> None:
        super().__init__()
        if not isinstance(fpn.extra_blocks, LastLevelMaxPool):
            raise ValueError("FusedFPN reproduces an FPN with LastLevelMaxPool only")
        self.inner = nn.ModuleList([ConvAct(b[0], relu=False) for b in fpn.inner_blocks])
        self.layer = nn.ModuleList([b[0] for b in fpn.layer_blocks])

    def forward(self, x):
        names = list(x.keys())
        feats = list(x.values())
        last = self.inner[-1](feats[-1])
        results = [self.layer[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            top_down = F.interpolate(last, size=feats[i].shape[-2:], mode="nearest")
            last = self.inner[i](feats[i], residual=top_down)
            results.insert(0, self.layer[i](last))
        # LastLevelMaxPool: P6 subsamples P5 (a 1x1 max pool with stride 2).
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names + ["pool"], results))


def fuse_heads(conv_relu_blocks: nn.Sequential) -> None:
    """Replaces each ``Sequential(conv, ReLU)`` of ``conv_relu_blocks`` (the RPN head's conv,
    the mask head) with a :class:`ConvAct`, in place."""
    if not _onednn_available():
        return
    for i, block in enumerate(conv_relu_blocks):
        conv_relu_blocks[i] = ConvAct(block[0], relu=True)
