"""A short RoIAlign demonstration: maskops and torchvision on the same Mask R-CNN-sized
input give the same result; maskops is faster. Run with `make demo`."""

import torch
import torchvision

import maskops
from maskops.check.timing import measure


def median_ms(fn, reps=5):
    # no warm-up call: torchvision's backward alone takes seconds here
    return measure(fn, "cpu", reps, warmup=0).median_ms


def main():
    torch.manual_seed(0)
    print(f"maskops {maskops.__version__}: {maskops.build_info()}")
    # A stride-16 feature map of two 800x800 images and 1000 proposals, as in a box head.
    features = torch.randn(2, 256, 50, 50)
    xy = torch.rand(1000, 2) * 700
    boxes = torch.cat([xy, xy + torch.rand(1000, 2) * 300 + 8], dim=1)
    rois = torch.cat([torch.randint(0, 2, (1000, 1)).float(), boxes], dim=1)
    args = dict(output_size=14, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)

    ours = maskops.roi_align(features, rois, **args)
    theirs = torchvision.ops.roi_align(features, rois, **args)
    print(
        f"output {tuple(ours.shape)}; max |maskops - torchvision| = "
        f"{(ours - theirs).abs().max().item():.2e}"
    )

    t_ours = median_ms(lambda: maskops.roi_align(features, rois, **args))
    t_tv = median_ms(lambda: torchvision.ops.roi_align(features, rois, **args), reps=3)
    print(
        f"forward : maskops {t_ours:7.1f} ms   torchvision {t_tv:7.1f} ms   {t_tv / t_ours:5.1f}x"
    )

    x1 = features.clone().requires_grad_()
    x2 = features.clone().requires_grad_()
    grad = torch.randn_like(ours)
    t_ours = median_ms(lambda: torch.autograd.grad(maskops.roi_align(x1, rois, **args), x1, grad))
    t_tv = median_ms(
        lambda: torch.autograd.grad(torchvision.ops.roi_align(x2, rois, **args), x2, grad), reps=1
    )
    (g1,) = torch.autograd.grad(maskops.roi_align(x1, rois, **args), x1, grad)
    (g2,) = torch.autograd.grad(torchvision.ops.roi_align(x2, rois, **args), x2, grad)
    print(
        f"fwd+bwd : maskops {t_ours:7.1f} ms   torchvision {t_tv:7.1f} ms   {t_tv / t_ours:5.1f}x"
        f"   (max grad diff {(g1 - g2).abs().max().item():.2e})"
    )


if __name__ == "__main__":
    main()
