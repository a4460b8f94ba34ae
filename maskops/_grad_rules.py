"""Where this torch's autograd passes a gradient at a kink, so that maskops' hand-written
backward formulas give exactly what autograd through torchvision's plain-torch code gives on
the same torch.

torch changed the rule for ``clamp`` between the versions maskops supports: 2.11 passes the
gradient where the input equals a bound, 2.14 does not. It is read off this torch once, at
import, by differentiating a clamp at its bound.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _clamp_passes_gradient_at_bound() -> bool:
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros((), dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(x.clamp(min=0.0), x)
    return bool(g != 0)


CLAMP_PASSES_AT_BOUND: bool = _clamp_passes_gradient_at_bound()


def above(x: Tensor, bound) -> Tensor:
    """Where ``x.clamp(min=bound)`` passes the gradient (NaN: nowhere)."""
    return x >= bound if CLAMP_PASSES_AT_BOUND else x > bound


def below(x: Tensor, bound) -> Tensor:
    """Where ``x.clamp(max=bound)`` passes the gradient (NaN: nowhere)."""
    return x <= bound if CLAMP_PASSES_AT_BOUND else x < bound
