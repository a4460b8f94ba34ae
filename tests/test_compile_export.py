"""Every public op under torch.compile(fullgraph=True, dynamic=True) and torch.export.export,
with results equal to eager."""
import pytest
import torch

import maskops


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    xy = torch.rand(12, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(12, 2, generator=g) * 20 + 1], dim=1)
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), boxes], dim=1)
    return dict(
        x=x, rois=rois, boxes=boxes, scores=torch.rand(12, generator=g),
        idxs=torch.randint(0, 3, (12,), generator=g),
        levels=[torch.randn(1, 4, 32 // 2**i, 32 // 2**i, generator=g) for i in range(3)],
        masks=torch.rand(12, 1, 28, 28, generator=g),
    )


# name -> (function of tensors, names of the tensor arguments)
OPS = {
    "roi_align": (lambda x, rois: maskops.roi_align(x, rois, 3, 0.25, 2, True), ("x", "rois")),
    "multiscale_roi_align": (lambda l0, l1, l2, boxes: maskops.multiscale_roi_align(
        [l0, l1, l2], [boxes], 3, [0.5, 0.25, 0.125], 2), ("l0", "l1", "l2", "boxes")),
    "nms": (lambda boxes, scores: maskops.nms(boxes, scores, 0.5), ("boxes", "scores")),
    "batched_nms": (lambda boxes, scores, idxs: maskops.batched_nms(boxes, scores, idxs, 0.5),
                    ("boxes", "scores", "idxs")),
    "box_iou": (lambda boxes: maskops.box_iou(boxes, boxes), ("boxes",)),
    "box_area": (lambda boxes: maskops.box_area(boxes), ("boxes",)),
    "paste_masks": (lambda masks, boxes: maskops.paste_masks(masks, boxes, (60, 70)), ("masks", "boxes")),
    "paste_masks_float": (lambda masks, boxes: maskops.paste_masks(masks, boxes, (60, 70), None),
                          ("masks", "boxes")),
}


def _args(names):
    d = _data()
    d.update({f"l{i}": t for i, t in enumerate(d["levels"])})
    return tuple(d[n] for n in names)


@pytest.mark.parametrize("name", list(OPS))
def test_compile_fullgraph_dynamic(name):
    fn, names = OPS[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    args = _args(names)
    expected = fn(*args)
    got = compiled(*args)
    assert torch.equal(got, expected) if got.dtype in (torch.bool, torch.int64) else \
        torch.allclose(got, expected, atol=1e-6)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("name", list(OPS))
def test_export(name):
    fn, names = OPS[name]
    args = _args(names)
    ep = torch.export.export(_Wrap(fn), args)
    got, expected = ep.module()(*args), fn(*args)
    assert torch.equal(got, expected) if got.dtype in (torch.bool, torch.int64) else \
        torch.allclose(got, expected, atol=1e-6)
