"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone, on maskops' ops.

The pipeline, each stage a module::

    images ─▶ transform ─▶ backbone (ResNet + FPN) ─▶ rpn ─▶ roi_heads (box, mask) ─▶ postprocess
    list[Tensor[3, H_i, W_i]]                          proposals   detections    input-size masks

Built by :func:`models.build.build_model` (``build_mask_rcnn("resnet50")``), it has exactly
the state_dict keys and shapes of torchvision's ``maskrcnn_resnet50_fpn``, so torchvision
checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from maskops import cpu

from . import ops
from .backbone import ResNetFPN
from .fuse import (
    FusedFPN,
    MatmulMaskPredictor,
    fast_inference,
    fold_batchnorms,
    forget_packed_weights,
    fpn_fusable,
    fuse_conv_relu,
    fuse_heads,
    fuse_linears,
    fuse_rpn_predictors,
    onednn_available,
)
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
            or ``torch.inference_mode()``) runs the arithmetic of
            :meth:`optimize_for_inference` on the model's own modules: each layer (ResNet
            block, FPN, heads) computes from derived weights it keeps (batch norms folded,
            reordered for oneDNN; the only extra copy), made on first use and again when
            that layer's own parameters change (an optimizer step, ``load_state_dict``,
            ``.to()``; writes through ``.data`` are not seen: see
            :meth:`clear_inference_cache`). The modules, state_dict and training are
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

    def __init__(
        self,
        transform: ImageTransform,
        backbone: ResNetFPN,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        mask_threshold: Optional[float] = 0.5,
        fast_inference: bool = True,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_threshold = mask_threshold
        self.fast_inference = fast_inference
        self.inference_optimized = False
        self.recorder: Optional[StageRecorder] = None

    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Union[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if torch.is_autocast_enabled("cpu"):
            cpu.warn_if_slow(torch.get_autocast_dtype("cpu"), stacklevel=3)
        if self._use_fast_path():
            with ops.cpu_cache_for_torch(), fast_inference():
                return self._forward(images, targets)
        if self.inference_optimized and self._inferring():
            with ops.cpu_cache_for_torch():
                return self._forward(images, targets)
        return self._forward(images, targets)

    def _forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
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
            proposals, proposal_scores, rpn_losses = self.rpn(
                batch, list(features.values()), targets
            )
        keep(rec, "proposals", (proposals, proposal_scores))
        detections, roi_losses = self.roi_heads(
            features, proposals, batch.image_sizes, targets, rec
        )
        if self.training:
            return {**roi_losses, **rpn_losses}
        keep(rec, "mask_probs", [d["masks"] for d in detections])
        with stage(rec, "paste"):
            detections = self.transform.postprocess(
                detections, batch.image_sizes, original_sizes, self.mask_threshold
            )
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
    def optimize_for_inference(
        self,
        channels_last: bool = True,
        fuse: bool = True,
        dtype: Union[torch.dtype, str, None] = None,
    ) -> "MaskRCNN":
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
        forget_packed_weights(self)  # fast inference's derived weights: not used any more
        heads = self.roi_heads
        heads.mask_predictor = _rewrite_for_inference(
            self.backbone,
            self.rpn.head,
            heads.box_head,
            heads.box_predictor,
            heads.mask_head,
            heads.mask_predictor,
            heads.box_roi_pool.output_size,
            channels_last,
            fuse,
        )
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

    def inference_context(self):
        """The context this model's forward runs its stages in, now: fast inference's fused
        routes (:func:`models.fuse.fast_inference`) where it applies, else nothing. For
        code that runs the stages one by one as the forward would."""
        return fast_inference() if self._use_fast_path() else contextlib.nullcontext()

    def clear_inference_cache(self) -> None:
        """Drops what inference keeps between calls, remade on the next one: each layer's
        derived weights (fast inference) and the weights packed for oneDNN. Needed only
        after writing weights in a way torch does not count as a change (through ``.data``,
        or in place in tensors made under ``torch.inference_mode``)."""
        forget_packed_weights(self)

    def train(self, mode: bool = True) -> "MaskRCNN":
        if mode:  # training changes the weights: the derived copies would only take memory
            forget_packed_weights(self)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .double() ...: copies derived from the old tensors are dropped now
        # rather than held until the next inference.
        forget_packed_weights(self)
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.inference_optimized:
            raise RuntimeError(
                "this model was rewritten by optimize_for_inference(); load "
                "weights into a fresh model, then optimize it"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (
            f"mask_threshold={self.mask_threshold}, fast_inference={self.fast_inference}, "
            f"inference_optimized={self.inference_optimized}"
        )


def _check_dtype(dtype) -> None:
    if dtype not in (None, "auto", torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"dtype must be torch.bfloat16, torch.float16, 'auto' or None, got {dtype!r}"
        )


@torch.no_grad()
def _rewrite_for_inference(
    backbone: ResNetFPN,
    rpn_head: nn.Module,
    box_head: BoxHead,
    box_predictor: nn.Module,
    mask_head: nn.Module,
    mask_predictor: nn.Module,
    box_pool_size,
    channels_last: bool,
    fuse: bool,
) -> nn.Module:
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


def _check_targets(targets, num_images: int) -> None:
    if targets is None:
        raise ValueError("targets are needed in training mode")
    if len(targets) != num_images:
        raise ValueError(f"need one target per image ({num_images}), got {len(targets)}")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"targets[{i}]['boxes'] must be a Tensor[G, 4], got "
                f"{getattr(boxes, 'shape', type(boxes))}"
            )
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive "
                "width and height; boxes are (x1, y1, x2, y2) with x1 < x2, y1 < y2"
            )
