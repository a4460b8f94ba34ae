"""ResNet + Feature Pyramid Network backbone (torchvision's modules, torchvision's layout)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from . import fuse

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

# The trainable parts of a ResNet, last first: `trainable_layers=k` trains the first k.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's basic block (same modules, same state_dict keys); in fast inference
    (:func:`models.fuse.fast_inference`) its convolutions, folded norms, ReLUs and residual
    add run as fused oneDNN calls on the derived weights each convolution keeps.
    ``overwrite_input``: the caller no longer needs ``x`` (see :class:`models.fuse.FusedLayer`)."""

    def forward(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        if fuse.fast_inference_active():
            y = fuse.fused_block(self, x, overwrite_input)
            if y is not None:
                return y
        return super().forward(x)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's bottleneck block; in fast inference, fused as :class:`BasicBlock` is."""

    def forward(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        if fuse.fast_inference_active():
            y = fuse.fused_block(self, x, overwrite_input)
            if y is not None:
                return y
        return super().forward(x)


# torchvision's ResNets, with the blocks above.
_RESNET_LAYOUT = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNetBody(nn.Module):
    """A ResNet's stem and four stages, returning the output of each stage.

    Holds the ResNet's modules under their torchvision names (``conv1``, ``bn1``,
    ``layer1``...), so that state_dict keys match ``backbone.body.*`` of torchvision's
    detection models; the classifier (``avgpool``, ``fc``) is dropped.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``Tensor[N, 3, H, W]`` -> ``{"0": C2 (stride 4), "1": C3, "2": C4,
        "3": C5 (stride 32)}``."""
        if fuse.fast_inference_active():
            return self._fast(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            x = getattr(self, name)(x)
            out[str(i)] = x
        return out

    def _fast(self, x: Tensor) -> Dict[str, Tensor]:
        # Channels-last activations end to end; the stem's conv, norm and ReLU in one call;
        # each block after a layer's first may write over its input, the previous block's
        # output, which nothing outside the layer sees (as models.fuse.FusedLayer).
        x = x.contiguous(memory_format=torch.channels_last)
        if fuse.foldable_norm(self.bn1) and isinstance(self.relu, nn.ReLU):
            x = fuse.conv_unit(self.conv1, self.bn1, x, relu=True)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        out = OrderedDict()
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            layer = getattr(self, name)
            if type(layer) is nn.Sequential:
                for j, block in enumerate(layer):
                    fusable = isinstance(block, (BasicBlock, Bottleneck))
                    x = block(x, overwrite_input=j > 0) if fusable else block(x)
            else:
                x = layer(x)
            out[str(i)] = x
        return out


class ResNetFPN(nn.Module):
    """ResNet body + FPN: one 256-channel feature map per stride 4, 8, 16, 32 and 64.

    Attributes:
        out_channels: channels of every output level (256).
    """

    def __init__(self, body: ResNetBody, in_channels_list, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list, out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``Tensor[N, 3, H, W]`` -> ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``,
        each ``Tensor[N, 256, H / s, W / s]`` for strides ``s`` = 4, 8, 16, 32, 64."""
        features = self.body(x)
        if fuse.fast_inference_active():
            out = fuse.fused_fpn(self.fpn, features)
            if out is not None:
                return out
        return self.fpn(features)


def resnet_fpn(
    name: str = "resnet50",
    trainable_bn: bool = False,
    trainable_layers: int = 3,
    bn_eps: float = 1e-5,
) -> ResNetFPN:
    """Builds a randomly initialised ResNet-FPN backbone.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        trainable_bn: ``nn.BatchNorm2d`` (statistics updated in training) instead of
            ``FrozenBatchNorm2d`` (fixed statistics: fine-tuning and inference; the layout of
            torchvision's pretrained checkpoints).
        trainable_layers: how many ResNet parts, counted from ``layer4`` back to ``conv1``,
            get gradients (0 to 5); the others are frozen.
        bn_eps: the batch norms' epsilon (torchvision's COCO checkpoint expects 0.0).
    """
    if name not in RESNETS:
        raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    norm = nn.BatchNorm2d if trainable_bn else FrozenBatchNorm2d
    block, layers = _RESNET_LAYOUT[name]
    resnet = tv_resnet.ResNet(block, layers, norm_layer=norm)
    for m in resnet.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.eps = bn_eps
    train = list(_TRAINABLE_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for pname, p in resnet.named_parameters():
        if not any(pname.startswith(t) for t in train):
            p.requires_grad_(False)
    # Stage widths: 64 * 2**i for basic blocks, 4x that for bottlenecks.
    c2 = resnet.inplanes // 8
    return ResNetFPN(ResNetBody(resnet), [c2, c2 * 2, c2 * 4, c2 * 8])
