"""onnxruntime as a second peer for the model benchmark: torchvision's own Mask R-CNN exported
to ONNX (torch's TorchScript-based exporter, opset 17, as torchvision's tests do) and run by
onnxruntime's CPU provider at the same thread count.

The export takes ~30 s, so the file is cached (``MASKOPS_BENCH_CACHE``, default
``~/.cache/maskops-bench``), keyed by torch and torchvision versions, seed and image size.
onnxruntime is optional: :func:`load_peer` returns ``(None, reason)`` when it is missing.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torchvision


def cache_path(seed: int, size: int, model_size: int = 800) -> str:
    root = os.environ.get(
        "MASKOPS_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "maskops-bench")
    )
    name = (
        f"maskrcnn_resnet50_fpn-seed{seed}-{size}-min{model_size}-torch{torch.__version__}-"
        f"tv{torchvision.__version__}.onnx"
    ).replace("+", "_")
    return os.path.join(root, name)


class OnnxRuntimeModel:
    """Calls like a torchvision detection model on one image: ``model([image])`` returns
    ``[{"boxes", "labels", "scores", "masks"}]`` (masks as float probabilities)."""

    def __init__(self, session) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        (image,) = images
        boxes, labels, scores, masks = self.session.run(None, {self.input: image.numpy()})
        return [
            {
                "boxes": torch.from_numpy(boxes),
                "labels": torch.from_numpy(labels),
                "scores": torch.from_numpy(scores),
                "masks": torch.from_numpy(masks),
            }
        ]


def load_peer(
    tv: torch.nn.Module, image: torch.Tensor, seed: int, threads: int
) -> Tuple[Optional[OnnxRuntimeModel], str]:
    """``(model, "")``, or ``(None, why)`` when onnxruntime or the export is unavailable."""
    try:
        import onnxruntime
    except ImportError:
        return None, "onnxruntime is not installed (pip install onnxruntime)"
    path = cache_path(seed, image.shape[-1], tv.transform.min_size[0])
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    tv,
                    ([image],),
                    path + ".tmp",
                    dynamo=False,
                    opset_version=17,
                    input_names=["image"],
                    output_names=["boxes", "labels", "scores", "masks"],
                )
            os.replace(path + ".tmp", path)
        except Exception as e:  # an exporter that no longer supports this model
            return None, f"torchvision's model did not export to ONNX: {type(e).__name__}: {e}"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its output-shape notes on every call are expected
    # Its idle worker threads would otherwise spin after each run, taking a core from the
    # model timed next in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeModel(session), ""
