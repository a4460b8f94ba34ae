"""Inference-only arithmetic of the model: batch norms folded into the convolutions before
them, and each convolution fused with the ReLU / residual add after it (CPU, oneDNN).

Two ways to use it. Fast inference (the default): within :func:`fast_inference`, the
model's own layers run these fused routes on *derived weights* (folded, reordered for
oneDNN) that each layer keeps for itself, remade when its own parameters change
(:func:`derived`); the model's modules and state_dict are untouched. ``optimize_for_
inference()``: the module rewrites below (:class:`ConvAct`, :class:`FusedBlock`, ...) replace
the layers in place. Both run the same fused calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

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
        if (
            isinstance(m, nn.Sequential)
            and len(m) == 2
            and isinstance(m[0], nn.Conv2d)
            and _is_bn(m[1])
        ):
            pairs.append((m, "0", "1"))
    return pairs


def _norm_tensors(bn: nn.Module) -> List[torch.Tensor]:
    return [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]


@torch.no_grad()
def folded(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A convolution's ``(weight, bias)`` with ``bn`` (eval-mode statistics) folded in, new
    tensors: ``bn(conv(x)) == conv'(x)``. The arithmetic is done in float64, then rounded
    once."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    scale = (bn.weight.double() if bn.weight is not None else 1.0) / std
    new_bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.double()
    if bias is not None:
        new_bias = new_bias + bias.double() * scale
    dtype = weight.dtype
    new_weight = (weight.double() * scale.view(-1, 1, 1, 1)).to(dtype)
    return new_weight, new_bias.to(dtype=dtype, device=weight.device)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Returns ``conv`` with ``bn`` (eval-mode statistics) folded into its weight and bias,
    in place: ``bn(conv(x)) == conv'(x)`` (see :func:`folded`)."""
    weight, bias = folded(conv.weight, conv.bias, bn)
    conv.weight.copy_(weight)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return conv


def fold_batchnorms(module: nn.Module) -> int:
    """Folds every ResNet batch norm of ``module`` into its convolution and replaces the
    batch norm with ``nn.Identity``, in place. Returns the number folded.

    Inference only: a ``BatchNorm2d`` is folded with its running statistics (its eval-mode
    behaviour), and the state_dict afterwards has conv biases and no batch-norm entries.
    """
    pairs = conv_bn_pairs(module)
    for parent, conv_name, bn_name in pairs:
        fold_conv_bn(
            getattr(parent, conv_name) if not conv_name.isdigit() else parent[int(conv_name)],
            getattr(parent, bn_name) if not bn_name.isdigit() else parent[int(bn_name)],
        )
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


# ---- fast inference: each layer's own derived weights ----

_FAST = contextvars.ContextVar("models_fast_inference", default=False)
_DERIVED = "_derived_weights"


@contextlib.contextmanager
def fast_inference():
    """Within the block (the model's forward enters it for eval-mode inference without
    gradients), the layers built by :mod:`models` run their fused routes: the ResNet blocks,
    the FPN, the RPN head, the box and mask heads, each on the derived weights it keeps
    (:func:`derived`). Each route checks its input and falls back to the layer's own
    modules where oneDNN does not apply (other devices, autocast, gradients, dtypes)."""
    token = _FAST.set(True)
    try:
        yield
    finally:
        _FAST.reset(token)


def fast_inference_active() -> bool:
    return _FAST.get()


class _Derived:
    """One layer's derived weights, with the key of the tensors they were made from; in a
    copy or a pickle of the layer, an empty one (remade on use)."""

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry = None  # (key, value, the sources' tensors), replaced as a whole

    @property
    def value(self):
        return None if self.entry is None else self.entry[1]

    def __deepcopy__(self, memo) -> "_Derived":
        return _Derived()

    def __reduce__(self):
        return (_Derived, ())


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device, t.shape)


def derived(
    module: nn.Module, sources: Sequence[torch.Tensor], make: Callable[[], object], tag: tuple = ()
):
    """``make()``, kept in ``module`` (no parameter or buffer: state_dicts are unchanged) and
    made again when one of ``sources`` (the layer's own tensors it is made from) is replaced,
    moved, or written in place by an op torch counts (its version counter: an optimizer
    step, ``load_state_dict``, ``p.add_()`` under ``no_grad``), or when ``tag`` changes.
    Writes through ``.data``, and into inference tensors, are not seen: after those, call
    :func:`forget_packed_weights`. The check is a few tensors' address and version."""
    cache = module.__dict__.get(_DERIVED)
    if cache is None:
        cache = module.__dict__[_DERIVED] = _Derived()
    key = (tag,) + tuple(_tensor_key(t) for t in sources)
    entry = cache.entry
    if entry is None or entry[0] != key:
        with torch.no_grad():
            value = make()
        # The sources' memory is held with the copy, so that no later tensor can take one's
        # address and pass for it. One assignment: a concurrent call sees old or new.
        entry = cache.entry = (key, value, tuple(t.detach() for t in sources))
    return entry[1]


def forget_packed_weights(module: nn.Module) -> int:
    """Drops the derived and packed weight copies held in ``module`` and its children (they
    are remade on the next call); the number dropped. Needed only after writing weights
    through ``.data`` (or into inference tensors), which torch's version counter does not
    see."""
    n = 0
    for m in module.modules():
        for name in ("_packed", _DERIVED):
            if m.__dict__.pop(name, None) is not None:
                n += 1
    return n


def _conv_args(conv: nn.Conv2d) -> tuple:
    return (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)


def _conv_fusable(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None
) -> bool:
    if residual is not None:
        if torch.is_grad_enabled() and residual.requires_grad:
            return False  # the sum's gradient needs autograd
        if residual.dim() != 4 or residual.shape[2] * residual.shape[3] == 1:
            # torch 2.11's oneDNN sum convolution fails on a 1x1 output ("could not create
            # a memory") with a packed or channels-last weight; a map that small costs
            # nothing on the plain path.
            return False
    return _onednn_ok(x, weight)


def _conv_pointwise(
    conv: nn.Conv2d,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    relu: bool,
    residual: Optional[torch.Tensor],
    overwrite_residual: bool,
) -> torch.Tensor:
    """``act(conv(x) [+ residual])`` in one oneDNN call, with ``conv``'s geometry and the
    given (packed) weight and bias."""
    padding, stride, dilation, groups = _conv_args(conv)
    post = "relu" if relu else None
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, padding, stride, dilation, groups, post or "none", [], ""
        )
    if overwrite_residual and _writable_output(conv, x, residual):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, padding, stride, dilation, groups, "add", 1.0, post, [], ""
        )
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0, post, [], ""
    )


def _pack_conv(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    padding, stride, dilation, groups = _conv_args(conv)
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, stride, dilation, groups, list(x.shape)
    )


def conv_unit(
    conv: nn.Conv2d,
    bn: Optional[nn.Module],
    x: torch.Tensor,
    relu: bool,
    residual: Optional[torch.Tensor] = None,
    overwrite_residual: bool = False,
) -> torch.Tensor:
    """``act(bn(conv(x)) [+ residual])``: on oneDNN's path one fused call on ``conv``'s
    derived weight (``bn`` folded in, reordered for oneDNN for the first input's shape),
    kept in ``conv`` (:func:`derived`); elsewhere the modules themselves. ``bn``: None, or a
    batch norm with running statistics in eval mode (see :func:`foldable_norm`).
    ``overwrite_residual``: see :meth:`ConvAct.forward`."""
    if (
        conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or not _conv_fusable(x, conv.weight, residual)
    ):
        y = conv(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    def make():
        weight, bias = (
            (conv.weight, conv.bias) if bn is None else folded(conv.weight, conv.bias, bn)
        )
        return _pack_conv(conv, weight, x), bias

    sources = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    tag = ("conv",)
    if bn is not None:
        sources += _norm_tensors(bn)
        tag = ("conv", bn.eps)
    weight, bias = derived(conv, sources, make, tag)
    return _conv_pointwise(conv, x, weight, bias, relu, residual, overwrite_residual)


def foldable_norm(bn: nn.Module) -> bool:
    """Whether ``bn`` computes with fixed statistics (a frozen batch norm, or a batch norm in
    eval mode with running statistics), so that it folds into the convolution before it."""
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    return (
        isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _block_plan(block: nn.Module):
    """``([(conv, bn), ...], (conv, bn) of the projection or None)`` of a torchvision ResNet
    block (basic or bottleneck) whose norms fold; None for any other block."""
    units = []
    for k in ("1", "2", "3"):
        conv, bn = getattr(block, "conv" + k, None), getattr(block, "bn" + k, None)
        if conv is None and bn is None:
            break
        if not (isinstance(conv, nn.Conv2d) and foldable_norm(bn)):
            return None
        units.append((conv, bn))
    if len(units) < 2 or not isinstance(getattr(block, "relu", None), nn.ReLU):
        return None
    down = getattr(block, "downsample", None)
    if down is None:
        return units, None
    if (
        isinstance(down, nn.Sequential)
        and len(down) == 2
        and isinstance(down[0], nn.Conv2d)
        and foldable_norm(down[1])
    ):
        return units, (down[0], down[1])
    return None


def fused_block(
    block: nn.Module, x: torch.Tensor, overwrite_input: bool = False
) -> Optional[torch.Tensor]:
    """A torchvision ResNet block as :class:`FusedBlock` computes it, on the derived weights
    its convolutions keep (:func:`conv_unit`); None where that does not apply (the caller
    then runs the block as it is). ``overwrite_input``: see :class:`FusedBlock`."""
    plan = _block_plan(block)
    if plan is None or not _conv_fusable(x, block.conv1.weight):
        return None
    units, down = plan
    identity = x if down is None else conv_unit(down[0], down[1], x, relu=False)
    own = overwrite_input or down is not None
    for conv, bn in units[:-1]:
        x = conv_unit(conv, bn, x, relu=True)
    conv, bn = units[-1]
    return conv_unit(conv, bn, x, relu=True, residual=identity, overwrite_residual=own)


def conv_relu_blocks(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``blocks`` (a ``Sequential`` of ``Sequential(conv, ReLU)``: the mask head, the RPN
    head's conv) with each block as one :func:`conv_unit`; other blocks as they are."""
    for block in blocks:
        if (
            isinstance(block, nn.Sequential)
            and len(block) == 2
            and isinstance(block[0], nn.Conv2d)
            and isinstance(block[1], nn.ReLU)
        ):
            x = conv_unit(block[0], None, x, relu=True)
        else:
            x = block(x)
    return x


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

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        overwrite_residual: bool = False,
    ) -> torch.Tensor:
        """``overwrite_residual``: the caller no longer needs ``residual`` (a tensor of its
        own), so the sum may be written into it: reading and writing the same memory costs
        less than writing a new tensor (~4 % of the backbone's time)."""
        if not _conv_fusable(x, self.conv.weight, residual):
            y = self.conv(x)
            if residual is not None:
                y = y + residual
            return torch.relu(y) if self.relu else y
        w = self._prepacked(self.conv.weight, lambda w: _pack_conv(self.conv, w, x))
        return _conv_pointwise(
            self.conv, x, w, self.conv.bias, self.relu, residual, overwrite_residual
        )

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _writable_output(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``residual`` can take ``conv(x)``'s output in place: its shape, dtype and
    channels-last layout (an inference tensor only inside inference mode)."""
    fmt = torch.channels_last
    if not (
        residual.dtype == x.dtype
        and x.dim() == 4
        and x.is_contiguous(memory_format=fmt)
        and residual.is_contiguous(memory_format=fmt)
        and (torch.is_inference_mode_enabled() or not residual.is_inference())
    ):
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
    if (
        isinstance(downsample, nn.Sequential)
        and len(downsample) == 2
        and isinstance(downsample[0], nn.Conv2d)
        and isinstance(downsample[1], nn.Identity)
    ):
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
    return isinstance(fpn.extra_blocks, LastLevelMaxPool) and all(
        len(b) == 1 and isinstance(b[0], nn.Conv2d) for b in blocks
    )


def _fpn(x, inner, layer):
    # torchvision's FPN forward (LastLevelMaxPool) with each lateral conv and its top-down
    # sum as one call: inner[i](t, residual=..., overwrite_residual=...), layer[i](t).
    names = list(x.keys())
    feats = list(x.values())
    last = inner[-1](feats[-1])
    results = [layer[-1](last)]
    for i in range(len(feats) - 2, -1, -1):
        top_down = F.interpolate(last, size=feats[i].shape[-2:], mode="nearest")
        last = inner[i](feats[i], residual=top_down, overwrite_residual=True)
        results.insert(0, layer[i](last))
    # LastLevelMaxPool: P6 subsamples P5 (a 1x1 max pool with stride 2).
    results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
    return OrderedDict(zip(names + ["pool"], results))


class _Unit:
    # One plain convolution as a ConvAct-like callable on its derived weight.
    __slots__ = ("conv",)

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x, residual=None, overwrite_residual=False):
        return conv_unit(self.conv, None, x, False, residual, overwrite_residual)


def fused_fpn(fpn: nn.Module, x) -> Optional[OrderedDict]:
    """torchvision's ``FeaturePyramidNetwork`` as :class:`FusedFPN` computes it, on the
    derived weights its convolutions keep; None where it does not apply."""
    if not fpn_fusable(fpn):
        return None
    return _fpn(x, [_Unit(b[0]) for b in fpn.inner_blocks], [_Unit(b[0]) for b in fpn.layer_blocks])


class FusedFPN(nn.Module):
    """torchvision's ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``) computing each
    lateral 1x1 conv and its top-down sum in one fused call. Same parameters, same output."""

    def __init__(self, fpn: nn.Module) -> None:
        super().__init__()
        if not fpn_fusable(fpn):
            raise ValueError(
                "FusedFPN reproduces an FPN of plain convolutions (no norm) with "
                "LastLevelMaxPool only"
            )
        self.inner = nn.ModuleList([ConvAct(b[0], relu=False) for b in fpn.inner_blocks])
        self.layer = nn.ModuleList([ConvAct(b[0], relu=False) for b in fpn.layer_blocks])

    def forward(self, x):
        return _fpn(x, self.inner, self.layer)


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
    return (
        x.device.type == "cpu"
        and onednn_dtype(x.dtype)
        and x.dtype == weight.dtype
        and not torch.is_autocast_enabled("cpu")
        and not needs_grad
        and x.numel() > 0
    )


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused CPU ops take ``dtype`` here: float32 always; bfloat16 only on a
    CPU where oneDNN computes it natively (elsewhere its weight reorder raises; the plain
    modules then run bfloat16 on torch's portable kernels)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu.features().native_bf16)


def _pack_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])


def _linear_pointwise(x, weight, bias, relu: bool) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def nhwc_columns(weight: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """``fc6``'s weight with its input columns reordered from ``(c, y, x)`` to ``(y, x, c)``,
    a new tensor: channels-last pooled features then flatten without a copy."""
    out = weight.shape[0]
    return (
        weight.view(out, channels, height, width).permute(0, 2, 3, 1).reshape(out, -1).contiguous()
    )


def linear_unit(
    linear: nn.Linear, x: torch.Tensor, relu: bool, nhwc: Optional[Tuple[int, int, int]] = None
) -> torch.Tensor:
    """``act(linear(x))``: on oneDNN's path one matmul (ReLU fused) on ``linear``'s derived
    weight (reordered for oneDNN; with ``nhwc = (c, h, w)``, its columns first put in
    ``(y, x, c)`` order, see :func:`nhwc_columns`), kept in ``linear``; elsewhere ``F.linear``
    (only without ``nhwc``: the caller checks :func:`_onednn_ok` first)."""
    if not _onednn_ok(x, linear.weight):
        if nhwc is not None:
            raise ValueError("linear_unit: nhwc columns need oneDNN's path")
        y = F.linear(x, linear.weight, linear.bias)
        return F.relu(y) if relu else y

    def make():
        w = linear.weight if nhwc is None else nhwc_columns(linear.weight, *nhwc)
        return _pack_linear(w, x)

    weight = derived(linear, [linear.weight], make, ("linear", nhwc))
    return _linear_pointwise(x, weight, linear.bias, relu)


def box_head_forward(head: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A :class:`~models.roi_heads.BoxHead` as :class:`LinearAct` layers compute it, on the
    derived weights ``fc6`` and ``fc7`` keep (``fc6``'s columns in ``(y, x, c)`` order, so
    that channels-last pooled features flatten without a copy); None where it does not
    apply."""
    fc6, fc7 = head.fc6, head.fc7
    if (
        type(fc6) is not nn.Linear
        or type(fc7) is not nn.Linear
        or head.relu_fused
        or x.dim() != 4
        or not _onednn_ok(x, fc6.weight)
    ):
        return None
    nhwc = None if head.nhwc_order else tuple(x.shape[1:])
    x = linear_unit(fc6, x.permute(0, 2, 3, 1).flatten(1), relu=True, nhwc=nhwc)
    return linear_unit(fc7, x, relu=True)


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
            return _linear_pointwise(x, w, self.bias, self.relu)
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


def _check_upsampling(deconv: nn.ConvTranspose2d) -> bool:
    return (
        tuple(deconv.kernel_size) == (2, 2)
        and tuple(deconv.stride) == (2, 2)
        and tuple(deconv.padding) == (0, 0)
        and deconv.groups == 1
        and tuple(deconv.dilation) == (1, 1)
        and tuple(deconv.output_padding) == (0, 0)
    )


def _upsampling_matrix(deconv: nn.ConvTranspose2d) -> Tuple[torch.Tensor, torch.Tensor]:
    # [C, O, 2, 2] -> [4 * O, C], rows ordered (a, b, o); the bias once per (a, b).
    w = deconv.weight
    b = deconv.bias if deconv.bias is not None else w.new_zeros(w.shape[1])
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).clone(), b.repeat(4).clone()


def _rows(x: torch.Tensor) -> torch.Tensor:
    # [N, C, H, W] -> [N*H*W, C]: a view when x is channels-last.
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _matmul_mask(
    x: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    logits_conv: nn.Conv2d,
) -> torch.Tensor:
    # See MatmulMaskPredictor: the upsampling as one matmul, then each RoI's own class.
    k, c, h, w = x.shape
    o = up_bias.shape[0] // 4
    up = _linear_pointwise(rows, up_weight, up_bias, relu=True)
    cls_w = logits_conv.weight[:, :, 0, 0][labels].to(up.dtype)  # [K, O]
    cls_b = logits_conv.bias[labels].to(up.dtype)  # [K]
    logits = torch.bmm(up.view(k, h * w * 4, o), cls_w[:, :, None]).view(k, h, w, 2, 2)
    logits = logits + cls_b[:, None, None, None, None]
    return logits.permute(0, 1, 3, 2, 4).reshape(k, 1, 2 * h, 2 * w)


def mask_predictor_forward(
    predictor: nn.Module, x: torch.Tensor, labels: torch.Tensor
) -> Optional[torch.Tensor]:
    """A :class:`~models.roi_heads.MaskPredictor` as :class:`MatmulMaskPredictor` computes
    it, on the derived upsampling matrix (reordered for oneDNN) the predictor keeps; None
    where it does not apply."""
    deconv = predictor.conv5_mask
    if (
        type(deconv) is not nn.ConvTranspose2d
        or not _check_upsampling(deconv)
        or x.dim() != 4
        or not _onednn_ok(x, deconv.weight)
    ):
        return None
    rows = _rows(x)

    def make():
        w, b = _upsampling_matrix(deconv)
        return _pack_linear(w, rows), b

    sources = [deconv.weight] + ([deconv.bias] if deconv.bias is not None else [])
    up_weight, up_bias = derived(predictor, sources, make, ("upsampling",))
    return _matmul_mask(x, rows, labels, up_weight, up_bias, predictor.mask_fcn_logits)


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
        if not _check_upsampling(predictor.conv5_mask):
            raise ValueError("MatmulMaskPredictor needs a 2x2, stride-2 transposed convolution")
        self.predictor = predictor
        with torch.no_grad():
            up_weight, up_bias = _upsampling_matrix(predictor.conv5_mask)
        self.register_buffer("up_weight", up_weight)
        self.register_buffer("up_bias", up_bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not _onednn_ok(x, self.up_weight):
            return self.predictor(x, labels)
        rows = _rows(x)
        up_weight = self._prepacked(self.up_weight, lambda w: _pack_linear(w, rows))
        return _matmul_mask(
            x, rows, labels, up_weight, self.up_bias, self.predictor.mask_fcn_logits
        )

    def all_classes(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.all_classes(x)


def _pointwise(
    t: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_anchors: int
):
    n = t.shape[0]
    y = _linear_pointwise(rows, weight, bias, relu=False)
    return y[:, :num_anchors].reshape(n, -1), y[:, num_anchors:].reshape(n, -1, 4)


def _pointwise_ok(t: torch.Tensor, weight: torch.Tensor) -> bool:
    return _onednn_ok(t, weight) and t.is_contiguous(memory_format=torch.channels_last)


def rpn_predictors(head: nn.Module, t: torch.Tensor):
    """The RPN head's two 1x1 convolutions as :class:`PointwisePredictor` computes them, on
    the derived (concatenated, reordered for oneDNN) weight the head keeps; None where it
    does not apply."""
    cls, box = head.cls_logits, head.bbox_pred
    if not (
        type(cls) is nn.Conv2d
        and type(box) is nn.Conv2d
        and cls.bias is not None
        and box.bias is not None
        and _pointwise_ok(t, cls.weight)
    ):
        return None
    rows = _rows(t)

    def make():
        w = torch.cat([cls.weight, box.weight])[:, :, 0, 0]
        return _pack_linear(w, rows), torch.cat([cls.bias, box.bias])

    weight, bias = derived(head, [cls.weight, cls.bias, box.weight, box.bias], make, ("rpn",))
    return _pointwise(t, rows, weight, bias, cls.out_channels)


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
        if not _pointwise_ok(t, self.weight):
            return None
        rows = _rows(t)
        weight = self._prepacked(self.weight, lambda w: _pack_linear(w, rows))
        return _pointwise(t, rows, weight, self.bias, self.num_anchors)


def fuse_rpn_predictors(rpn_head: nn.Module) -> None:
    """Gives the RPN head a :class:`PointwisePredictor`, in place."""
    if onednn_available():
        rpn_head.pointwise = PointwisePredictor(rpn_head.cls_logits, rpn_head.bbox_pred)
