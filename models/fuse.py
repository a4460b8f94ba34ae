"""Inference-only rewrites: folding batch norms into the convolutions before them."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


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
