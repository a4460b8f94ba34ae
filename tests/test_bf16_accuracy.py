"""bfloat16 inference keeps a trained model's accuracy: held-out box and mask AP of
``optimize_for_inference(dtype=torch.bfloat16)`` within 0.01 of the same model in float32.

The model is the demo's recipe (ResNet-18-FPN on the synthetic shapes data) trained briefly
here, so that AP measures something; ``benchmarks/bench_bf16_accuracy.py`` checks the same
bound on the fully trained demo model. The check is shown to fail on a real difference:
detections moved by 2 pixels change AP by more than the bound.
"""

import copy

import pytest
import torch

from models.build import model_from_checkpoint
from models.data import CocoDataset, collate
from models.data.shapes import generate
from models.engine import ShardSampler, train
from models.engine.demo import demo_config
from models.evaluation import evaluate

BOUND = 0.01  # AP, box and mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    generate(root / "shapes", 480, 80, 128, 0, 1, 3)
    train(demo_config(str(root / "shapes"), str(root / "run"), epochs=4))
    model, _ = model_from_checkpoint(root / "run" / "best.pt")
    val = CocoDataset(root / "shapes", "val")
    loader = torch.utils.data.DataLoader(
        val, batch_size=8, collate_fn=collate, sampler=ShardSampler(len(val), 0, 1)
    )
    return model.eval(), loader


def _ap(model, loader):
    ev = evaluate(model, loader, torch.device("cpu"))
    return {"box": ev.get("bbox"), "mask": ev.get("segm")}


def _within(reference, tested):
    return all(abs(tested[k] - reference[k]) <= BOUND for k in ("box", "mask"))


def test_bfloat16_weights_keep_ap_within_the_bound(trained):
    model, loader = trained
    fp32 = _ap(model, loader)
    # The bound only means something for a model that detects: the briefly trained one
    # reaches ~0.3 box and mask AP (the fully trained demo model ~0.6); measured here: bfloat16
    # moved them by -0.001 and +0.001, the 2 px shift below by -0.02.
    assert fp32["box"] > 0.2 and fp32["mask"] > 0.2, fp32
    bf16_model = copy.deepcopy(model).optimize_for_inference(dtype=torch.bfloat16)
    assert next(bf16_model.backbone.parameters()).dtype == torch.bfloat16
    bf16 = _ap(bf16_model, loader)
    assert _within(fp32, bf16), (fp32, bf16)

    # The same check fails on a real difference of about a bfloat16 error's size in pixels:
    # every box and mask of the float32 model moved by 2 px.
    shifted_ap = _ap(_Shifted(model, 2), loader)
    assert not _within(fp32, shifted_ap), (fp32, shifted_ap)


class _Shifted(torch.nn.Module):
    """``model`` with its detections moved ``px`` pixels right (boxes and masks)."""

    def __init__(self, model, px: int) -> None:
        super().__init__()
        self.model, self.px = model, px

    def forward(self, images):
        out = self.model(images)
        for d in out:
            d["boxes"] = d["boxes"] + torch.tensor([self.px, 0.0, self.px, 0.0])
            d["masks"] = torch.roll(d["masks"], self.px, dims=-1)
        return out
