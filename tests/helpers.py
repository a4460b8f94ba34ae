"""Input generators shared by the op tests, and the CPU-dependent cases."""

import contextlib

import pytest
import torch

from maskops import cpu
from maskops.check import inputs


def random_boxes(n, image_size, generator=None, min_size=1.0, max_size=None, dtype=torch.float32):
    """Tensor[n, 4] of (x1, y1, x2, y2) boxes starting inside an image of `image_size` (h, w),
    drawn in float32."""
    max_size = max_size or max(image_size) / 2
    return inputs.random_boxes(
        generator, n, image_size, min_size, max_size, margin=0, dtype=torch.float32
    ).to(dtype)


def random_rois(k, batch, image_size, generator=None, dtype=torch.float32, outside=False):
    """Tensor[k, 5] rows (batch_index, x1, y1, x2, y2).

    With `outside`, a third of the boxes are shifted partly or fully off the image.
    """
    boxes = random_boxes(k, image_size, generator).double()
    if outside and k:
        h, w = image_size
        shift = (torch.rand(k, 2, generator=generator) - 0.5) * 2 * torch.tensor([w, h])
        sel = torch.rand(k, generator=generator) < 0.33
        boxes[sel] += shift[sel].repeat(1, 2).double()
    idx = torch.randint(0, batch, (k, 1), generator=generator).double()
    return torch.cat([idx, boxes], dim=1).to(dtype)


def devices():
    """CPU always; CUDA when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def in_layout(x, kind):
    """The same values as a 4-d tensor in another memory layout: "channels_last", "sliced"
    (every other column of a wider tensor), "expanded" (stride 0 along the batch, when all
    batch entries are equal), anything else unchanged."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == "expanded" and x.shape[0] > 0:
        return x[:1].expand(x.shape[0], *x.shape[1:]) if bool((x == x[:1]).all()) else x
    return x


# ---- CPU-dependent paths (maskops.cpu) ----

# The dtypes the fused CPU layers take, each with its path: bfloat16 on oneDNN (where this
# CPU computes it natively) and bfloat16 on torch's portable kernels (native bfloat16
# pretended missing here; really missing under `make test-cpu-kinds`' emulated CPUs).
FUSED_CASES = ["float32", "bfloat16", "bfloat16-portable"]


@contextlib.contextmanager
def fused_case(case):
    """Yields ``(dtype, onednn)`` for a :data:`FUSED_CASES` entry: the dtype, and whether the
    fused layers run on oneDNN in it. Skips the native bfloat16 case on a CPU without it."""
    if case == "float32":
        yield torch.float32, True
    elif case == "bfloat16":
        if not cpu.features().native_bf16:
            pytest.skip("no native bfloat16 on this CPU (the -portable case runs instead)")
        yield torch.bfloat16, True
    elif case == "bfloat16-portable":
        with cpu.pretend(native_bf16=False):
            yield torch.bfloat16, False
    else:
        raise ValueError(case)
