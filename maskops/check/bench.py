"""A short speed table: maskops and torchvision on the same inputs, same process."""

from __future__ import annotations

from typing import List, Optional

import torch

import maskops

from .inputs import random_boxes
from .timing import measure


def bench(device: str, gen: Optional[torch.Generator] = None) -> List[dict]:
    """Short timings of maskops and torchvision on the same inputs, same process (medians)."""
    dev = torch.device(device)
    gen = gen or torch.Generator().manual_seed(0)
    try:
        import torchvision
    except Exception:  # noqa: BLE001
        torchvision = None
    gpu = dev.type == "cuda"
    reps = 20 if gpu else 5
    k, ch, fm = (1000, 256, 50) if gpu else (256, 64, 50)
    image = 800 if gpu else 400
    x = torch.randn(2, ch, fm, fm, generator=gen).to(dev)
    rois = torch.cat(
        [
            torch.randint(0, 2, (k, 1), generator=gen).float(),
            random_boxes(gen, k, fm * 16.0, 16.0, fm * 8.0).float(),
        ],
        1,
    ).to(dev)
    feats = {
        f"p{i}": torch.randn(2, ch, image // 2 ** (i + 2), image // 2 ** (i + 2), generator=gen).to(
            dev
        )
        for i in range(4)
    }
    per_image = [
        random_boxes(gen, k // 2, float(image), 16.0, image / 2).float().to(dev) for _ in range(2)
    ]
    n_nms = 20000 if gpu else 5000
    nb = random_boxes(gen, n_nms, 800.0, 4.0, 120.0).float().to(dev)
    ns = torch.rand(n_nms, generator=gen).to(dev)
    nc = torch.randint(0, 80, (n_nms,), generator=gen).to(dev)
    n_masks, m_image = (100, 800) if gpu else (50, 400)
    masks = torch.rand(n_masks, 1, 28, 28, generator=gen).to(dev)
    mboxes = random_boxes(gen, n_masks, m_image * 0.8, 10.0, m_image / 3).float().to(dev)
    codes = torch.randn(100000, 4, generator=gen).to(dev) * 0.2
    cboxes = random_boxes(gen, 100000, 800.0).float().to(dev)
    rows = []

    def add(op, workload, ours, theirs):
        t_ours = measure(ours, dev, reps).median_ms
        t_tv = (
            measure(theirs, dev, reps).median_ms
            if (theirs is not None and torchvision is not None)
            else None
        )
        rows.append(
            {
                "op": op,
                "device": device,
                "workload": workload,
                "maskops_ms": round(t_ours, 4),
                "torchvision_ms": None if t_tv is None else round(t_tv, 4),
                "speedup": None if t_tv is None else round(t_tv / t_ours, 2),
            }
        )

    tv = torchvision.ops if torchvision is not None else None
    work = f"{k} RoIs x {ch} ch, {fm}x{fm} map, 7x7"
    add(
        "roi_align forward",
        work,
        lambda: maskops.roi_align(x, rois, 7, 1 / 16, 2, True),
        tv and (lambda: tv.roi_align(x, rois, 7, 1 / 16, 2, True)),
    )
    xg = x.clone().requires_grad_()

    def fb(fn):
        def step():
            out = fn(xg, rois, 7, 1 / 16, 2, True)
            torch.autograd.grad(out, xg, torch.ones_like(out))

        return step

    add("roi_align fwd+bwd", work, fb(maskops.roi_align), tv and fb(tv.roi_align))
    names = list(feats)
    ours_pool = maskops.MultiScaleRoIAlign(names, 7, 2)
    tv_pool = tv.MultiScaleRoIAlign(names, 7, 2) if tv else None
    add(
        "MultiScaleRoIAlign forward",
        f"{k} RoIs, 4 levels of {image}x{image}, {ch} ch, 7x7",
        lambda: ours_pool(feats, per_image, [(image, image)] * 2),
        tv_pool and (lambda: tv_pool(feats, per_image, [(image, image)] * 2)),
    )
    add(
        "nms",
        f"{n_nms} boxes",
        lambda: maskops.nms(nb, ns, 0.5),
        tv and (lambda: tv.nms(nb, ns, 0.5)),
    )
    add(
        "batched_nms",
        f"{n_nms} boxes, 80 classes",
        lambda: maskops.batched_nms(nb, ns, nc, 0.5),
        tv and (lambda: tv.batched_nms(nb, ns, nc, 0.5)),
    )
    add(
        "box_iou",
        "1000 x 1000",
        lambda: maskops.box_iou(nb[:1000], nb[1000:2000]),
        tv and (lambda: tv.box_iou(nb[:1000], nb[1000:2000])),
    )
    if torchvision is not None:
        from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        tv_coder = TVBoxCoder((10.0, 10.0, 5.0, 5.0))
    add(
        "paste_masks to bool",
        f"{n_masks} masks 28x28 into {m_image}x{m_image}",
        lambda: maskops.paste_masks(masks, mboxes, (m_image, m_image), threshold=0.5),
        torchvision and (lambda: paste_masks_in_image(masks, mboxes, (m_image, m_image)) >= 0.5),
    )
    add(
        "decode_boxes",
        "100000 boxes",
        lambda: maskops.decode_boxes(codes, cboxes, (10.0, 10.0, 5.0, 5.0)),
        torchvision and (lambda: tv_coder.decode_single(codes, cboxes)),
    )
    fsizes = [(image // 2**i, image // 2**i) for i in range(2, 7)]
    tv_anchors = None
    if torchvision is not None:
        from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
        from torchvision.models.detection.image_list import ImageList

        gen_tv = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        images = ImageList(torch.zeros(1, 3, image, image, device=dev), [(image, image)])
        maps = [torch.zeros(1, 1, h, w, device=dev) for h, w in fsizes]

        def tv_anchors():
            return gen_tv(images, maps)

    add(
        "generate_anchors (uncached)",
        f"5 FPN levels of {image}x{image}, 3 ratios",
        lambda: maskops.generate_anchors(
            fsizes, [2**i for i in range(2, 7)], [32, 64, 128, 256, 512], device=dev, cache=False
        ),
        tv_anchors,
    )
    return rows
