"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone, on maskops' ops.

The pipeline, each stage a module::

    images ─▶ transform ─▶ backbone (ResNet + FPN) ─▶ rpn ─▶ roi_heads (box, mask) ─▶ postprocess
    list[Tensor[3, H_i, W_i]]                              proposals   detections    input-size masks

Built by :func:`models.build.build_model` (``build_mask_rcnn("resnet50")``), it has exactly
the state_dict keys and shapes of torchvision's ``maskrcnn_resnet50_fpn``, so torchvision
checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from maskops import cpu

from . import ops
from .backbone import ResNetFPN
from .fuse import (FusedFPN, MatmulMaskPredictor, fold_batchnorms, forget_packed_weights,
                   fpn_fusable, fuse_conv_relu, fuse_heads, fuse_linears, fuse_rpn_predictors,
                   onednn_available)
from .profiling import StageRecorder, keep, stage
from .roi_heads import BoxHead, MaskPredictor, RoIHeads
from .rpn import RegionProposalNetwork
from .transform import ImageTransform

# The stages of a forward, in order, as the stage recorder names them.
STAGES = ("transform", "backbone", "rpn", "roi_align", "box_head", "mask_head", "paste")


class MaskRCNN(nn.Module):
    """Mask R-CNN.

    Args:
        transform: :class:`ImageTransform`; backbone: :class:`ResNetFPN`;
        rpn: :class:`RegionProposalNetwork`; roi_heads: :class:`RoIHeads`.
        mask_threshold: inference: masks are returned as ``bool`` (``probability >=
            mask_threshold``); ``None`` returns probabilities (torchvision's output).
        fast_inference: inference without gradients (``eval()`` under ``torch.no_grad()``
            or ``torch.inference_mode()``) runs a rewritten copy of the backbone and heads
            (see :meth:`optimize_for_inference`), made on first use and again whenever a
            weight or the device changes (writes through ``.data`` are not seen: see
            :meth:`clear_inference_cache`); the model itself, its state_dict and training are
            untouched. ``False`` (or ``model.fast_inference = False``) runs the modules as
            they are.

    Inference (``eval()``): ``model(images)`` with ``images`` a list of ``Tensor[3, H_i,
    W_i]`` in ``[0, 1]`` (sizes may differ) returns per image::

        {"boxes": Tensor[D, 4] (x1, y1, x2, y2) input-image pixels, "labels": Tensor[D] int64,
         "scores": Tensor[D], "masks": Tensor[D, 1, H_i, W_i] bool (or float)}

    sorted by decreasing score. Training (``train()``): ``model(images, targets)`` with per
    image ``boxes: Tensor[G, 4]``, ``labels: Tensor[G]`` int64, ``masks: Tensor[G, H_i, W_i]``
    returns ``{"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
    "loss_rpn_box_reg"}`` (torchvision's names).

    Autocast (``torch.autocast(..., dtype=torch.bfloat16)``) runs the convolutions and
    linear layers in half precision; box coordinates, scores and masks stay float32.
    """

    def __init__(self, transform: ImageTransform, backbone: ResNetFPN,
                 rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 mask_threshold: Optional[float] = 0.5, fast_inference: bool = True) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_threshold = mask_threshold
        self.fast_inference = fast_inference
        self.inference_optimized = False
        self.recorder: Optional[StageRecorder] = None
        # (key, rewritten parts) for fast inference; a plain attribute, not a submodule, so
        # that it is in no state_dict.
        self.__dict__["_fast_parts"] = None

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Union[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if torch.is_autocast_enabled("cpu"):
            cpu.warn_if_slow(torch.get_autocast_dtype("cpu"), stacklevel=3)
        if self._use_fast_path():
            with ops.cpu_cache_for_torch():
                return self._fast_view()(images)
        if self.inference_optimized and self._inferring():
            with ops.cpu_cache_for_torch():
                return self._forward(images, targets)
        return self._forward(images, targets)

    def _forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
                 ) -> Union[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        rec = self.recorder
        if self.training:
            _check_targets(targets, len(images))
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]

        with stage(rec, "transform"):
            batch, targets = self.transform(images, targets)
        keep(rec, "input", tuple(batch.tensors.shape))
        keep(rec, "image_sizes", batch.image_sizes)
        with stage(rec, "backbone"):
            features = self.backbone(batch.tensors)
        keep(rec, "features", features)
        with stage(rec, "rpn"):
            proposals, proposal_scores, rpn_losses = self.rpn(batch, list(features.values()),
                                                              targets)
        keep(rec, "proposals", (proposals, proposal_scores))
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes,
                                                targets, rec)
        if self.training:
            return {**roi_losses, **rpn_losses}
        keep(rec, "mask_probs", [d["masks"] for d in detections])
        with stage(rec, "paste"):
            detections = self.transform.postprocess(detections, batch.image_sizes,
                                                    original_sizes, self.mask_threshold)
        return detections

    @contextlib.contextmanager
    def record_stages(self, keep_outputs: bool = False):
        """Records each stage's time (and output, with ``keep_outputs``) in the forwards run
        inside the block::

            with model.record_stages() as rec:
                model(images)
            rec.times  # {"transform": s, "backbone": s, "rpn": s, "roi_align": s, ...}
        """
        device = next(self.parameters()).device
        rec = StageRecorder(keep_outputs=keep_outputs, device=device)
        previous, self.recorder = self.recorder, rec
        try:
            yield rec
        finally:
            self.recorder = previous

    @torch.no_grad()
    def optimize_for_inference(self, channels_last: bool = True, fuse: bool = True,
                               dtype: Union[torch.dtype, str, None] = None) -> "MaskRCNN":
        """Rewrites the model, in place, for fast inference, and returns it in eval mode.

        - folds the backbone's batch norms into the convolutions before them;
        - with ``fuse`` (CPU, where oneDNN's fused convolution is available), runs each
          convolution with the ReLU and residual/top-down add that follow it as one call:
          ResNet blocks, FPN laterals, RPN head and mask head; and runs the box head, the
          box predictor, the RPN head's 1x1 convolutions and the mask predictor's 2x2
          transposed convolution as oneDNN matmuls (``models/fuse.py``), each weight kept
          in oneDNN's blocked layout from its first call on (a second copy of the weights in
          memory, never in the state_dict; after writing weights through ``.data``, call
          :meth:`clear_inference_cache`);
        - with ``channels_last``, stores the convolutions' weights and batches images
          channels-last, so that activations stay channels-last end to end, and reorders
          ``fc6`` so that the pooled box features flatten without a copy;
        - with ``dtype=torch.bfloat16`` (or ``float16``), stores the weights in that type and
          batches images in it, so that every convolution and linear layer runs in half
          precision (on CPUs with AMX, far faster than float32). Unlike autocast, no weight
          is cast per call. Box coordinates, scores and mask probabilities stay float32.
          On a CPU where that type is slower than float32 (no native bfloat16, or no
          bfloat16 dot-product units: see :mod:`maskops.cpu`) it still runs, on torch's
          portable kernels where oneDNN cannot take it, and a warning says so (once).
          ``dtype="auto"`` takes bfloat16 only where it is native and faster (AMX, AVX-512
          BF16; on a GPU, bfloat16 where supported), float32 elsewhere.

        In float32, detections are unchanged up to float rounding. Load weights first:
        afterwards the state_dict no longer has torchvision's layout.
        """
        _check_dtype(dtype)
        if self.inference_optimized:
            return self
        device = next(self.parameters()).device
        dtype = cpu.resolve_dtype(dtype, device)
        cpu.warn_if_slow(dtype, device, stacklevel=3)
        self.eval()
        self.__dict__["_fast_parts"] = None
        heads = self.roi_heads
        heads.mask_predictor = _rewrite_for_inference(
            self.backbone, self.rpn.head, heads.box_head, heads.box_predictor, heads.mask_head,
            heads.mask_predictor, heads.box_roi_pool.output_size, channels_last, fuse)
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self.transform.channels_last = True
        if dtype is not None and dtype != torch.float32:
            for part in (self.backbone, self.rpn, self.roi_heads):
                part.to(dtype)
            self.transform.dtype = dtype
        self.inference_optimized = True
        return self

    # ---- fast inference by default ----

    def _inferring(self) -> bool:
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def _use_fast_path(self) -> bool:
        if not self._inferring() or not self.fast_inference or self.inference_optimized:
            return False
        p = next(self.parameters(), None)
        return p is not None and p.dtype == torch.float32

    def _weights_key(self) -> Tuple:
        """Changes whenever a parameter or buffer is replaced (``.data`` assignments too),
        moved, or written in place by an op torch counts (not through ``.data``, nor in an
        inference tensor: see :meth:`clear_inference_cache`)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return tuple((id(t), t.device, t.data_ptr(), None if t.is_inference() else t._version)
                     for t in tensors)

    def clear_inference_cache(self) -> None:
        """Drops what inference keeps between calls, remade on the next one: the fast path's
        rewritten copy and the weights packed for oneDNN. Needed only after writing weights
        in a way torch does not count as a change (through ``.data``, or in place in
        tensors made under ``torch.inference_mode``)."""
        self.__dict__["_fast_parts"] = None
        forget_packed_weights(self)

    def _fast_view(self) -> "MaskRCNN":
        """This model with its backbone and heads swapped for rewritten copies (cached). The
        view is made per call: every setting (thresholds, sizes, mask_threshold, recorder) is
        the model's own at the time of the call."""
        key = self._weights_key()
        cached = self.__dict__["_fast_parts"]
        if cached is None or cached[0] != key:
            heads = self.roi_heads
            parts = copy.deepcopy(nn.ModuleDict(dict(
                backbone=self.backbone, rpn_head=self.rpn.head, box_head=heads.box_head,
                box_predictor=heads.box_predictor, mask_head=heads.mask_head,
                mask_predictor=heads.mask_predictor)))
            parts["mask_predictor"] = _rewrite_for_inference(
                parts["backbone"], parts["rpn_head"], parts["box_head"], parts["box_predictor"],
                parts["mask_head"], parts["mask_predictor"], heads.box_roi_pool.output_size,
                True, True)
            parts.to(memory_format=torch.channels_last)
            # The weights' memory is held with the copy, so that no later weight can take
            # one's address and pass for it.
            held = [t.detach() for t in list(self.parameters()) + list(self.buffers())]
            cached = (key, parts, held)
            self.__dict__["_fast_parts"] = cached
        parts = cached[1]
        view = _shallow(self, backbone=parts["backbone"],
                        rpn=_shallow(self.rpn, head=parts["rpn_head"]),
                        roi_heads=_shallow(self.roi_heads, box_head=parts["box_head"],
                                           box_predictor=parts["box_predictor"],
                                           mask_head=parts["mask_head"],
                                           mask_predictor=parts["mask_predictor"]),
                        transform=_shallow(self.transform))
        view.transform.channels_last = True
        view.fast_inference = False
        return view

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.inference_optimized:
            raise RuntimeError("this model was rewritten by optimize_for_inference(); load "
                               "weights into a fresh model, then optimize it")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (f"mask_threshold={self.mask_threshold}, fast_inference={self.fast_inference}, "
                f"inference_optimized={self.inference_optimized}")


def _check_dtype(dtype) -> None:
    if dtype not in (None, "auto", torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, 'auto' or None, got "
                         f"{dtype!r}")


@torch.no_grad()
def _rewrite_for_inference(backbone: ResNetFPN, rpn_head: nn.Module, box_head: BoxHead,
                           box_predictor: nn.Module, mask_head: nn.Module,
                           mask_predictor: nn.Module, box_pool_size, channels_last: bool,
                           fuse: bool) -> nn.Module:
    """The module rewrites of :meth:`MaskRCNN.optimize_for_inference`, in place; returns the
    mask predictor to use (the given one, or a :class:`MatmulMaskPredictor` around it)."""
    fold_batchnorms(backbone.body)
    if fuse and onednn_available():
        fuse_conv_relu(backbone.body)
        if fpn_fusable(backbone.fpn):
            backbone.fpn = FusedFPN(backbone.fpn)
        fuse_heads(rpn_head.conv)
        fuse_rpn_predictors(rpn_head)
        fuse_heads(mask_head)
        fuse_linears(box_head, box_predictor)
        if isinstance(mask_predictor, MaskPredictor):
            mask_predictor = MatmulMaskPredictor(mask_predictor)
    if channels_last:
        h, w = box_pool_size
        box_head.use_nhwc_order(backbone.out_channels, h, w)
    return mask_predictor


def _shallow(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (settings shared as they are now) with some children
    replaced, leaving ``module`` itself untouched."""
    out = copy.copy(module)
    out._modules = dict(module._modules, **children)
    return out


def _check_targets(targets, num_images: int) -> None:
    if targets is None:
        raise ValueError("targets are needed in training mode")
    if len(targets) != num_images:
        raise ValueError(f"need one target per image ({num_images}), got {len(targets)}")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be a Tensor[G, 4], got "
                             f"{getattr(boxes, 'shape', type(boxes))}")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive "
                             "width and height; boxes are (x1, y1, x2, y2) with x1 < x2, y1 < y2")
