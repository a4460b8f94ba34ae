"""Writes the inference model as a file another runtime runs: images in; boxes, labels,
scores, masks out (the export tool: ``python -m tools.export``).

Formats:
  pt2   ``torch.export`` program (``torch.export.load(path).module()([image])``).
  onnx  ONNX (opset 18) through ``torch.onnx.export(dynamo=True)`` with maskops' op
        translations (``maskops.onnx``): one input ``image`` ``Tensor[3, H, W]``, outputs
        ``boxes``, ``labels``, ``scores``, ``masks``. Runs in onnxruntime without maskops.
  aoti  an AOTInductor package (``torch._inductor.aoti_compile_and_package``): load it with
        ``torch._inductor.aoti_load_package(path)`` after ``import maskops`` (the ops' kernels
        come from maskops' library) and call it with ``[image]``.

Every format is specialised to the example's image size (the resize factor is computed from
it in Python): export once per input size. The numbers of proposals and detections are
data-dependent (NMS, score thresholds) and stay symbolic, so one file serves any image of
that size, including one with no detections.

``check_file`` runs the written file on the example image and compares its detections with
the eager model's (:func:`models.evaluation.compare_detections`): every detection matched with
the same label, boxes within ``box_tol`` px (default 0.25) and scores within ``score_tol``
(default 1e-4), and matched masks agreeing on at least 99.9 % of pixels. The same model in
another runtime differs only by float rounding (other kernels summing in other orders,
amplified by the network), measured: the tiny ResNet-18 test model at 96-128 px, 3e-4 px and
2e-7 in score (ONNX), 7e-5 px (AOTI); ResNet-50 FPN at 800 x 1066 (two classes, random
weights, 100 detections), 4.8e-2 px and 1.3e-6 in score (ONNX), 1.25e-2 px and 5e-7 (AOTI).
The bounds leave 5x room there and still catch a real difference (a box moved by a pixel, a
changed class, a missing detection). A mask pixel can flip where its probability sits at
the 0.5 threshold, hence the agreement bound rather than equality.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor

from .evaluation.agreement import DetectionDiff, compare_detections
from .mask_rcnn import MaskRCNN

FORMATS = ("pt2", "onnx", "aoti")
OUTPUTS = ("boxes", "labels", "scores", "masks")
MASK_AGREEMENT = 0.999


def export_model(model: MaskRCNN, images: List[Tensor]) -> torch.export.ExportedProgram:
    """Exports ``model`` (put in eval mode) for lists of images shaped like ``images``.

    ``optimize_for_inference()`` models export too: the fused oneDNN calls step aside while
    tracing, so the program holds plain convolutions with the folded weights.

    Returns:
        The ``ExportedProgram``; ``program.module()(images)`` runs it, ``torch.export.save``
        writes it.
    """
    model.eval()
    with torch.no_grad():
        return torch.export.export(model, (list(images),), strict=False)


class _OneImage(torch.nn.Module):
    """One image in, a tuple of tensors out: the plainest interface for other runtimes."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        d = self.model([image])[0]
        return tuple(d[k] for k in OUTPUTS)


def export_onnx(model: MaskRCNN, image: Tensor, path: str) -> None:
    """Writes ``model`` as ONNX for images of ``image``'s size (see the module docstring)."""
    import maskops.onnx

    model.eval()
    with torch.no_grad():
        torch.onnx.export(
            _OneImage(model).eval(),
            (image,),
            path,
            dynamo=True,
            opset_version=maskops.onnx.OPSET,
            input_names=["image"],
            output_names=list(OUTPUTS),
            verbose=False,
            custom_translation_table=maskops.onnx.custom_translation_table(),
        )


def onnx_runner(path: str):
    """``run(image) -> {"boxes", "labels", "scores", "masks"}`` with onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(image: Tensor) -> Dict[str, Tensor]:
        out = session.run(None, {"image": image.detach().cpu().numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(OUTPUTS, out)}

    return run


def export_aoti(model: MaskRCNN, image: Tensor, path: str) -> str:
    """Compiles ``model`` ahead of time with AOTInductor into the package ``path`` (.pt2)."""
    program = export_model(model, [image])
    with _nested_list_outputs():
        # layout_optimization off: with it, Inductor hands the convolutions' outputs to
        # maskops' RoIAlign in channels-last while the op's traced output layout came from
        # the NCHW features, and the mask head then read the pooled features with the wrong
        # strides (masks differed on ~8 % of pixels, boxes did not).
        return torch._inductor.aoti_compile_and_package(
            program, package_path=path, inductor_configs={"layout_optimization": False}
        )


@contextlib.contextmanager
def _nested_list_outputs():
    """Lets AOTInductor's C++ wrapper read data-dependent sizes out of an op that returns
    lists of tensors (``maskops.rpn_proposals``: ``(Tensor[], Tensor[])``, every size
    data-dependent). torch 2.14's wrapper looks a size up as ``outputs[i].size(0)`` and fails
    on ``outputs[i][j]`` ("'list' object has no attribute 'get_name'"); given the outputs
    flattened and the paths renumbered to match, it writes the same code for the tensors."""
    from torch._inductor.codegen import wrapper
    from torch.utils import _pytree as pytree

    original = wrapper.PythonWrapperCodegen._codegen_unbacked_symbol_defs_for_outputs

    def patched(self, output_name, outputs, unbacked_bindings):
        if (
            unbacked_bindings
            and isinstance(outputs, (list, tuple))
            and any(isinstance(o, (list, tuple)) for o in outputs)
            and torch._inductor.virtualized.V.graph.cpp_wrapper
        ):
            flat, index = [], {}
            for i, o in enumerate(outputs):
                for j, t in enumerate(o if isinstance(o, (list, tuple)) else [o]):
                    index[(i, j) if isinstance(o, (list, tuple)) else (i,)] = len(flat)
                    flat.append(t)
            renumbered = {}
            for sym, path in unbacked_bindings.items():
                if (
                    len(path) >= 2
                    and isinstance(path[0], pytree.SequenceKey)
                    and isinstance(path[1], pytree.SequenceKey)
                    and (path[0].idx, path[1].idx) in index
                ):
                    path = (pytree.SequenceKey(index[(path[0].idx, path[1].idx)]),) + path[2:]
                elif isinstance(path[0], pytree.SequenceKey) and (path[0].idx,) in index:
                    path = (pytree.SequenceKey(index[(path[0].idx,)]),) + path[1:]
                renumbered[sym] = path
            outputs, unbacked_bindings = flat, renumbered
        return original(self, output_name, outputs, unbacked_bindings)

    wrapper.PythonWrapperCodegen._codegen_unbacked_symbol_defs_for_outputs = patched
    try:
        yield
    finally:
        wrapper.PythonWrapperCodegen._codegen_unbacked_symbol_defs_for_outputs = original


def aoti_runner(path: str):
    """``run(image) -> detections`` from an AOTInductor package (needs ``import maskops``)."""
    import maskops  # noqa: F401  (registers the ops the package calls)

    compiled = torch._inductor.aoti_load_package(path)

    def run(image: Tensor) -> Dict[str, Tensor]:
        return compiled([image])[0]

    return run


def pt2_runner(path: str):
    program = torch.export.load(path).module()

    def run(image: Tensor) -> Dict[str, Tensor]:
        return program([image])[0]

    return run


RUNNERS = {"pt2": pt2_runner, "onnx": onnx_runner, "aoti": aoti_runner}


def write(fmt: str, model: MaskRCNN, image: Tensor, path: str) -> None:
    if fmt == "pt2":
        torch.export.save(export_model(model, [image]), path)
    elif fmt == "onnx":
        export_onnx(model, image, path)
    elif fmt == "aoti":
        export_aoti(model, image, path)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


@dataclass
class FileCheck:
    """What :func:`check_file` found: ``ok`` when the file's detections match the eager
    model's; median times in ms."""

    fmt: str
    diff: DetectionDiff
    ok: bool
    eager_ms: float
    file_ms: float
    reps: int

    def __bool__(self) -> bool:
        return self.ok


def check_file(
    fmt: str,
    model: MaskRCNN,
    image: Tensor,
    path: str,
    box_tol: float = 0.25,
    score_tol: float = 1e-4,
    reps: int = 3,
) -> FileCheck:
    """Runs the file at ``path`` on ``image`` and compares with the eager model (see the
    module docstring), and times both runtimes: medians over ``reps`` runs after one warm-up.
    """
    run = RUNNERS[fmt](path)
    with torch.inference_mode():
        expected, got = model([image])[0], run(image)
        eager_t, file_t = [], []
        for _ in range(reps):  # alternated, so both see the same machine load
            t = time.perf_counter()
            model([image])
            eager_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(image)
            file_t.append(time.perf_counter() - t)
    diff = compare_detections(expected, got, box_tol=box_tol, score_tol=score_tol)
    ok = diff.identical() and (not diff.pairs or diff.mask_agreement >= MASK_AGREEMENT)
    return FileCheck(
        fmt, diff, ok, statistics.median(eager_t) * 1e3, statistics.median(file_t) * 1e3, reps
    )
