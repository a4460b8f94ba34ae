"""The checks of one device (:class:`Checker`), one ``check_<group>`` method per group of
ops, each adding report rows; :data:`GROUPS` names them."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import maskops

from .inputs import clear_rois, near_int, rand64, random_boxes, redraw, without_close_calls
from .references import (
    expanded_boxes,
    ref_anchors,
    ref_area,
    ref_clip,
    ref_decode,
    ref_encode,
    ref_fpn_levels,
    ref_iou,
    ref_nms,
    ref_paste,
    ref_rle,
    ref_roi_align,
    ref_roi_align_backward,
)
from .report import Case, Result, dtype_name, first_line
from .tolerances import F64, HALF_TYPES, amax, half_rounding, roundoff, tolerance


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(on) for the block: maskops' CUDA RoIAlign backward
    then uses its gather algorithm instead of atomics. (warn_only: other ops merely warn.)"""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(on, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)


class Checker:
    """The checks of one device. Each ``check_<group>`` method adds report rows."""

    def __init__(
        self, device: torch.device, full: bool, gen: torch.Generator, emit: Callable[[Result], None]
    ):
        self.device, self.full, self.gen, self.emit = device, full, gen, emit
        self.dev = str(device)
        self.cuda = device.type == "cuda"
        self.results: List[Result] = []
        try:
            import torchvision  # noqa: F401  (optional: parity rows when installed)

            self.tv = torchvision
        except Exception:  # noqa: BLE001 - a broken torchvision is as good as none here
            self.tv = None

    # ---- plumbing

    @contextlib.contextmanager
    def rows(self, *specs):
        """Report rows (op, dtype, check) filled in by the block; yields one Case per spec
        (the case itself for one spec). An error escaping the block fails all of them; wrap
        independent steps in ``case.guard(label)`` so that an error fails only that row."""
        cases = [Case(op, self.dev, dtype_name(dtype), check) for op, dtype, check in specs]
        t0 = time.perf_counter()
        try:
            yield cases[0] if len(cases) == 1 else cases
        except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
            for c in cases:
                c.fail(first_line(e))
        if self.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        seconds = (time.perf_counter() - t0) / len(cases)
        for c in cases:
            row = c.finish(seconds)
            self.results.append(row)
            self.emit(row)

    def case(self, op: str, dtype, check: str):
        return self.rows((op, dtype, check))

    def leaf(self, x: torch.Tensor, device=None) -> torch.Tensor:
        """A copy of ``x`` on the device that requires grad (``x`` itself is left alone)."""
        return x.detach().to(self.device if device is None else device).clone().requires_grad_()

    def on(self, x, device=None):
        device = self.device if device is None else device
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(self.on(v, device) for v in x)
        return x

    def dtypes(self, half: bool = True) -> List[torch.dtype]:
        out = [torch.float32, F64]
        if half and self.full:
            out += [torch.float16, torch.bfloat16]
        elif half and self.cuda:
            out += [torch.float16]
        return out

    # ---- RoIAlign

    def _grad(self, fn, inputs, grad, deterministic=False):
        """fn's output and the gradient of ``(output * grad).sum()`` for each input."""
        with deterministic_algorithms(True) if deterministic else contextlib.nullcontext():
            out = fn(*inputs)
            return out, torch.autograd.grad(out, inputs, grad)

    def check_roi_align(self):
        cases = [
            ((2, 8, 20, 24), (7, 7), 1 / 4, 2, True),  # (N, C, H, W), out, scale, sr, aligned
            ((1, 3, 9, 13), (3, 5), 1.0, -1, False),
        ]
        if self.full:
            cases += [
                ((2, 16, 33, 41), (14, 14), 1 / 8, 0, True),
                ((3, 5, 16, 16), (2, 9), 1 / 16, 1, False),
                ((1, 40, 13, 50), (7, 7), 1 / 16, 3, True),
                ((2, 32, 50, 50), (7, 7), 1 / 16, 2, True),
            ]
        layouts = ["nchw", "channels_last"] if self.full else ["nchw"]
        for dtype in self.dtypes():
            done = []
            with self.rows(
                ("roi_align", dtype, "forward vs float64 ref"),
                ("roi_align", dtype, "backward vs float64 ref"),
                ("roi_align", dtype, "backward deterministic: ref, repeat"),
            ) as (fwd, bwd, det):
                for shape, (ph, pw), scale, sr, aligned in cases:
                    n, c, h, w = shape
                    x = torch.randn(*shape, generator=self.gen, dtype=F64).to(dtype)
                    rois = clear_rois(
                        self.gen,
                        13 if self.full else 9,
                        n,
                        (h / scale, w / scale),
                        scale,
                        ph,
                        pw,
                        (h, w),
                        sr,
                        aligned,
                        dtype,
                    )
                    ref, weights = ref_roi_align(x, rois, ph, pw, scale, sr, aligned)
                    g = torch.randn(ref.shape, generator=self.gen, dtype=F64).to(dtype)
                    ref_g = ref_roi_align_backward(weights, g, [shape])[0]
                    ref_ga = ref_roi_align_backward(weights, g.abs(), [shape])[0]  # sum of |terms|
                    # Sample positions carry roundoff u * (map size); outputs are averages of x
                    # and gradients sums of grad terms, so scale by those magnitudes.
                    t_f = tolerance(dtype, (1 + max(h, w)) * amax(x.to(F64)), 8, amax(ref))
                    t_b = tolerance(dtype, (1 + max(h, w)) * amax(ref_ga), 16, amax(ref_g))
                    label = f"{tuple(shape)}->{ph}x{pw} scale {scale:g} sr {sr} aligned {aligned}"
                    args = (rois, (ph, pw), scale, sr, aligned)
                    pool = self._pool(maskops.roi_align, args)
                    for layout in layouts:
                        xi = (
                            x
                            if layout == "nchw"
                            else x.contiguous(memory_format=torch.channels_last)
                        )
                        lab = f"{label} {layout}"
                        with fwd.guard(lab, bwd):
                            out, (gi,) = self._grad(pool, [self.leaf(xi)], self.on(g))
                            fwd.close(out, ref, t_f, lab, dtype=dtype)
                            if layout == "channels_last" and not out.is_contiguous(
                                memory_format=torch.channels_last
                            ):
                                fwd.fail(f"{lab}: the output is not channels_last")
                            bwd.close(gi, ref_g, t_b, lab, dtype=dtype)
                            if not self.cuda:  # the CPU backward is deterministic in every mode
                                bwd.equal(
                                    self._grad(pool, [self.leaf(xi)], g)[1][0],
                                    gi,
                                    f"{lab}: 2nd run",
                                )
                        with det.guard(lab):
                            g1 = self._grad(pool, [self.leaf(xi)], self.on(g), deterministic=True)[
                                1
                            ][0]
                            g2 = self._grad(pool, [self.leaf(xi)], self.on(g), deterministic=True)[
                                1
                            ][0]
                            det.close(g1, ref_g, t_b, lab, dtype=dtype)
                            det.equal(g2, g1, f"{lab}: 2nd run")
                    done.append((args, x, g, t_f, t_b, label))
            if self.cuda:
                with self.case("roi_align", dtype, "forward+backward vs CPU kernel") as cmp:
                    for args, x, g, t_f, t_b, label in done:
                        with cmp.guard(label):
                            pool = self._pool(maskops.roi_align, args)
                            out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g))
                            out_c, (gi_c,) = self._grad(pool, [self.leaf(x, "cpu")], g)
                            cmp.close(out, out_c, 2 * t_f, label, dtype=dtype)
                            cmp.close(gi, gi_c, 2 * t_b, label, dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("roi_align", dtype, "forward+backward vs torchvision") as cmp:
                    for args, x, g, t_f, t_b, label in done:
                        with cmp.guard(label):
                            pool = self._pool(maskops.roi_align, args)
                            tv_pool = self._pool(self.tv.ops.roi_align, args)
                            out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g))
                            out_t, (gi_t,) = self._grad(tv_pool, [self.leaf(x)], self.on(g))
                            cmp.close(out, out_t, 2 * t_f, label, dtype=dtype)
                            cmp.close(gi, gi_t, 2 * t_b, label, dtype=dtype)
        if self.cuda and self.full:
            self._large_roi_align()
        x = torch.randn(2, 2, 5, 6, generator=self.gen, dtype=F64)
        rois = clear_rois(self.gen, 3, 2, (10, 12), 0.5, 2, 3, (5, 6), 2, True, F64)
        self._gradcheck(
            "roi_align",
            lambda t, r: maskops.roi_align(t, r, (2, 3), 0.5, 2, True),
            [x, rois],
            grad_args=(0,),
        )

    def _large_roi_align(self):
        """Mask R-CNN sizes (many thread blocks) on the GPU against the CPU kernel."""
        shape, k, scale = (2, 256, 50, 50), 1000, 1 / 16
        for dtype in (torch.float32, torch.float16):
            with self.case("roi_align", dtype, f"{k} RoIs x {shape[1]} ch vs CPU kernel") as c:
                x = torch.randn(*shape, generator=self.gen).to(dtype)
                rois = clear_rois(self.gen, k, 2, (800, 800), scale, 7, 7, (50, 50), 2, True, dtype)
                g = torch.randn(k, shape[1], 7, 7, generator=self.gen).to(dtype)

                def pool(t, rois=rois):
                    return maskops.roi_align(t, rois.to(t.device), 7, scale, 2, True)

                out_c, (gi_c,) = self._grad(pool, [self.leaf(x, "cpu")], g)
                (g_abs,) = self._grad(pool, [self.leaf(x.float(), "cpu")], g.float().abs())[1]
                t_f = tolerance(dtype, 51 * amax(x.float()), 8, amax(out_c.float()))
                t_b = tolerance(dtype, 51 * amax(g_abs), 16, amax(gi_c.float()))
                for det in (False, True):
                    lab = "deterministic" if det else "atomic"
                    with c.guard(lab):
                        out, (gi,) = self._grad(pool, [self.leaf(x)], self.on(g), deterministic=det)
                        c.close(out, out_c, t_f, f"forward ({lab})", dtype=dtype)
                        c.close(gi, gi_c, t_b, f"backward ({lab})", dtype=dtype)

    @staticmethod
    def _pool(fn, args):
        """``fn(features, rois, *rest)`` with ``args = (rois, *rest)``, the RoIs moved to the
        features' device."""
        rois, *rest = args
        return lambda t: fn(t, rois.to(t.device), *rest)

    def _gradcheck(self, op, fn, inputs, grad_args):
        """torch.autograd.gradcheck in float64 on small inputs; on CUDA also with the
        deterministic backward (whose repeated runs must agree bit for bit)."""
        for det in [False, True] if self.cuda else [False]:
            with self.case(op, F64, "gradcheck" + (" deterministic" if det else "")) as c:
                args = [
                    self.leaf(t) if i in grad_args else self.on(t) for i, t in enumerate(inputs)
                ]
                # CUDA atomics may add in another order on each run: allow float64 roundoff
                nondet = 1e-12 if self.cuda and not det else 0.0
                with deterministic_algorithms(det) if self.cuda else contextlib.nullcontext():
                    torch.autograd.gradcheck(fn, args, nondet_tol=nondet, raise_exception=True)
                c.row.cases += 1

    # ---- multi-level RoIAlign

    def check_multiscale_roi_align(self):
        ih = iw = 256
        n, ch, k_min, n_lv = 2, 4, 2, 4
        scales = [2.0 ** -(k_min + i) for i in range(n_lv)]
        configs = [
            (64.0, 4.0, 2, False),
            (64.0, 4.0, -1, True),
        ]  # canonical scale, level, sr, aligned
        if self.full:
            configs += [(224.0, 4.0, 0, True), (32.0, 3.0, 3, False)]
        for dtype in self.dtypes():
            done = []
            with self.rows(
                ("multiscale_roi_align", dtype, "forward vs float64 ref"),
                ("multiscale_roi_align", dtype, "backward vs float64 ref"),
                ("multiscale_roi_align", dtype, "backward deterministic: ref, repeat"),
            ) as (fwd, bwd, det):
                for cs, cl, sr, aligned in configs:
                    feats = [
                        torch.randn(
                            n, ch, int(ih * s), int(iw * s), generator=self.gen, dtype=F64
                        ).to(dtype)
                        for s in scales
                    ]
                    maps = [tuple(f.shape[2:]) for f in feats]
                    rois = clear_rois(
                        self.gen,
                        24 if self.full else 16,
                        n,
                        (ih, iw),
                        scales,
                        3,
                        3,
                        maps,
                        sr,
                        aligned,
                        dtype,
                        levels=(n_lv, k_min, cs, cl),
                    )
                    if self.full:  # an inverted box: negative area, no level, zeros
                        rois[0, 1:] = torch.tensor([30.0, 20.0, 10.0, 60.0], dtype=rois.dtype)
                    levels = ref_fpn_levels(rois, n_lv, k_min, cs, cl)
                    ref, weights = ref_roi_align(feats, rois, 3, 3, scales, sr, aligned, levels)
                    g = torch.randn(ref.shape, generator=self.gen, dtype=F64).to(dtype)
                    shapes = [f.shape for f in feats]
                    ref_g = ref_roi_align_backward(weights, g, shapes)
                    ref_ga = ref_roi_align_backward(weights, g.abs(), shapes)
                    big = max(max(m) for m in maps)
                    t_f = tolerance(
                        dtype, (1 + big) * max(amax(f.to(F64)) for f in feats), 8, amax(ref)
                    )
                    t_b = [
                        tolerance(dtype, (1 + big) * amax(a), 16, amax(r))
                        for a, r in zip(ref_ga, ref_g)
                    ]
                    label = f"canonical {cs:g}/{cl:g} sr {sr} aligned {aligned}"

                    def pool(*fs, r=rois, q=sr, a=aligned, cs=cs, cl=cl):
                        return maskops.multiscale_roi_align(
                            list(fs), r.to(fs[0].device), 3, scales, q, cs, cl, a
                        )

                    with fwd.guard(label, bwd):
                        out, grads = self._grad(pool, [self.leaf(f) for f in feats], self.on(g))
                        fwd.close(out, ref, t_f, label, dtype=dtype)
                        for lv, (gi, rg, t) in enumerate(zip(grads, ref_g, t_b)):
                            bwd.close(gi, rg, t, f"{label} level {lv}", dtype=dtype)
                    with det.guard(label):
                        d1 = self._grad(
                            pool, [self.leaf(f) for f in feats], self.on(g), deterministic=True
                        )[1]
                        d2 = self._grad(
                            pool, [self.leaf(f) for f in feats], self.on(g), deterministic=True
                        )[1]
                        for lv, (a1, a2, rg, t) in enumerate(zip(d1, d2, ref_g, t_b)):
                            det.close(a1, rg, t, f"{label} level {lv}", dtype=dtype)
                            det.equal(a2, a1, f"{label} level {lv}: 2nd run")
                    done.append((pool, feats, rois, g, t_f, t_b, label, (cs, cl, sr, aligned)))
            if self.cuda:
                with self.case(
                    "multiscale_roi_align", dtype, "forward+backward vs CPU kernel"
                ) as cmp:
                    for pool, feats, rois, g, t_f, t_b, label, _ in done:
                        with cmp.guard(label):
                            out, grads = self._grad(pool, [self.leaf(f) for f in feats], self.on(g))
                            out_c, grads_c = self._grad(
                                pool, [self.leaf(f, "cpu") for f in feats], g
                            )
                            cmp.close(out, out_c, 2 * t_f, label, dtype=dtype)
                            for a1, a2, t in zip(grads, grads_c, t_b):
                                cmp.close(a1, a2, 2 * t, label, dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("multiscale_roi_align", dtype, "forward vs torchvision") as cmp:
                    for pool, feats, rois, g, t_f, t_b, label, (cs, cl, sr, aligned) in done:
                        if aligned:
                            continue  # torchvision's module pools with aligned=False only
                        with cmp.guard(label):
                            names = [f"p{i}" for i in range(n_lv)]
                            tv_pool = self.tv.ops.MultiScaleRoIAlign(
                                names, 3, sr, canonical_scale=cs, canonical_level=cl
                            )
                            # torchvision has no level for a negative area: leave those out
                            r = rois[ref_area(rois[:, 1:]) >= 0]
                            per_image = [self.on(r[r[:, 0] == b][:, 1:]) for b in range(n)]
                            r = torch.cat([r[r[:, 0] == b] for b in range(n)])
                            got = tv_pool(
                                dict(zip(names, self.on(feats))), per_image, [(ih, iw)] * n
                            )
                            ours = maskops.multiscale_roi_align(
                                self.on(feats), self.on(r), 3, scales, sr, cs, cl, aligned
                            )
                            cmp.close(ours, got, 2 * t_f, label, dtype=dtype)
        f0 = torch.randn(1, 2, 8, 8, generator=self.gen, dtype=F64)
        f1 = torch.randn(1, 2, 4, 4, generator=self.gen, dtype=F64)
        # with canonical scale 32 the first and last box read level 0, the second level 1
        rois = torch.tensor(
            [[0, 1.0, 2.0, 9.0, 13.0], [0, 3.0, 1.0, 30.0, 28.0], [0, 0.5, 0.5, 20.0, 6.0]],
            dtype=F64,
        )
        self._gradcheck(
            "multiscale_roi_align",
            lambda a, b, r: maskops.multiscale_roi_align(
                [a, b], r, 2, [0.25, 0.125], 2, 32, 4, True
            ),
            [f0, f1, rois],
            grad_args=(0, 1),
        )

    # ---- NMS

    def check_nms(self):
        sizes = [300, 2000] if self.full else [300]
        thresholds = [0.5, 0.3, 0.7] if self.full else [0.5]
        for dtype in self.dtypes():
            done = []
            with self.rows(
                ("nms", dtype, "vs greedy float64 ref"),
                ("batched_nms", dtype, "vs greedy float64 ref"),
            ) as (c_nms, c_bat):
                for n in sizes:
                    # the same density of boxes whatever n is
                    boxes = random_boxes(self.gen, n, 256.0 * math.sqrt(n / 300)).to(dtype)
                    boxes = boxes[without_close_calls(boxes, thresholds, 1e-3)]
                    n = boxes.shape[0]
                    scores = torch.rand(n, generator=self.gen)
                    if self.full and dtype == torch.float16:
                        scores = scores.half()  # many equal scores: ties go by index
                    classes = torch.randint(0, 7, (n,), generator=self.gen)
                    b, s, k = self.on(boxes), self.on(scores), self.on(classes)
                    for thr in thresholds:
                        label = f"{n} boxes iou>{thr}"
                        ref = ref_nms(boxes, scores, thr)
                        ref_b = ref_nms(boxes, scores, thr, classes)
                        got = got_b = None
                        with c_nms.guard(label):
                            got = maskops.nms(b, s, thr)
                            c_nms.equal(got, ref, label, dtype=torch.int64)
                        with c_bat.guard(label):
                            got_b = maskops.batched_nms(b, s, k, thr)
                            c_bat.equal(got_b, ref_b, label, dtype=torch.int64)
                        done.append((boxes, scores, classes, thr, label, got, got_b))
                        if self.full:  # score_threshold and max_output
                            st, mo = 0.3, max(1, len(ref) // 2)
                            lab = f"{label} score>{st} max {mo}"
                            with c_nms.guard(lab):
                                got2 = maskops.nms(b, s, thr, score_threshold=st, max_output=mo)
                                c_nms.equal(
                                    got2, ref[scores[ref].to(F64) > st][:mo], lab, dtype=torch.int64
                                )
                            with c_bat.guard(lab):
                                got2 = maskops.batched_nms(
                                    b, s, k, thr, score_threshold=st, max_output=mo
                                )
                                c_bat.equal(
                                    got2,
                                    ref_b[scores[ref_b].to(F64) > st][:mo],
                                    lab,
                                    dtype=torch.int64,
                                )
            if self.cuda:
                with self.case("nms", dtype, "nms+batched_nms vs CPU kernel") as cmp:
                    for boxes, scores, classes, thr, label, got, got_b in done:
                        with cmp.guard(label):
                            cmp.equal(got, maskops.nms(boxes, scores, thr), label)
                            cmp.equal(
                                got_b, maskops.batched_nms(boxes, scores, classes, thr), label
                            )
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("nms", dtype, "nms+batched_nms vs torchvision") as cmp:
                    for boxes, scores, classes, thr, label, got, got_b in done:
                        with cmp.guard(label):
                            b, s, k = self.on(boxes), self.on(scores.to(dtype)), self.on(classes)
                            cmp.equal(got, self.tv.ops.nms(b, s, thr), label)
                            tv_b = self.tv.ops.batched_nms(b, s, k, thr)
                            if n > 1000:  # torchvision merges classes with an unstable sort there
                                got_b, tv_b = got_b.sort().values, tv_b.sort().values
                            cmp.equal(got_b, tv_b, label)
        if self.cuda and self.full:
            self._large_nms()

    def _large_nms(self):
        """20000 boxes (hundreds of 64-box blocks) on the GPU against the CPU kernel."""
        n = 20000
        with self.case("nms", torch.float32, f"{n} boxes vs CPU kernel") as c:
            boxes = self.on(random_boxes(self.gen, n, 256.0 * math.sqrt(n / 300)).float())
            boxes = boxes[without_close_calls(boxes, [0.5], 1e-3)]
            scores = self.on(torch.rand(boxes.shape[0], generator=self.gen))
            classes = self.on(torch.randint(0, 80, (boxes.shape[0],), generator=self.gen))
            c.equal(
                maskops.nms(boxes, scores, 0.5), maskops.nms(boxes.cpu(), scores.cpu(), 0.5), "nms"
            )
            c.equal(
                maskops.batched_nms(boxes, scores, classes, 0.5),
                maskops.batched_nms(boxes.cpu(), scores.cpu(), classes.cpu(), 0.5),
                "batched_nms",
            )
            c.equal(
                maskops.nms(boxes, scores, 0.5, max_output=100),
                maskops.nms(boxes.cpu(), scores.cpu(), 0.5)[:100],
                "nms max_output 100",
            )

    # ---- box IoU and area

    def check_boxes(self):
        for dtype in self.dtypes():
            a = random_boxes(self.gen, 700 if self.full else 40).to(dtype)
            b = random_boxes(self.gen, 500 if self.full else 31).to(dtype)
            if self.full:  # two equal zero-area boxes: union 0, IoU 0 (not NaN)
                a[0] = b[0] = torch.tensor([5.0, 5.0, 5.0, 9.0]).to(dtype)
            ref_i, ref_a = ref_iou(a, b), ref_area(a)
            label = f"{tuple(a.shape)} x {tuple(b.shape)}"
            # differences and products of exact inputs round once each: a few roundoffs
            t_i, t_a = tolerance(dtype, 1.0, 8), tolerance(dtype, amax(ref_a), 4)
            with self.case("box_iou", dtype, "vs float64 ref") as c:
                got = maskops.box_iou(self.on(a), self.on(b))
                c.close(got, ref_i, t_i, label, dtype=dtype)
            with self.case("box_area", dtype, "vs float64 ref") as c:
                got_a = maskops.box_area(self.on(a))
                c.close(got_a, ref_a, t_a, label, dtype=dtype)
            if self.cuda:
                with self.case("box_iou", dtype, "box_iou+box_area vs CPU kernel") as c:
                    c.close(got, maskops.box_iou(a, b), 2 * t_i, "iou", dtype=dtype)
                    c.close(got_a, maskops.box_area(a), 2 * t_a, "area", dtype=dtype)
            if self.tv is not None and dtype in (torch.float32, F64):
                with self.case("box_iou", dtype, "box_iou+box_area vs torchvision") as c:
                    ok = ref_area(a) > 0  # torchvision gives NaN where the union is 0
                    c.close(
                        got[self.on(ok)],
                        self.tv.ops.box_iou(self.on(a[ok]), self.on(b)),
                        2 * t_i,
                        "iou",
                    )
                    c.close(got_a, self.tv.ops.box_area(self.on(a)), 2 * t_a, "area")
        self._gradcheck(
            "box_iou",
            maskops.box_iou,
            [
                random_boxes(self.gen, 4, 32.0, 2.0, 16.0),
                random_boxes(self.gen, 3, 32.0, 2.0, 16.0),
            ],
            grad_args=(0, 1),
        )
        self._gradcheck("box_area", maskops.box_area, [random_boxes(self.gen, 5)], grad_args=(0,))

    # ---- anchors

    def check_anchors(self):
        # torchvision's FPN defaults on a 200x304 image (the last stride uneven) ...
        configs = [
            (
                [(50, 76), (25, 38), (13, 19), (7, 10), (4, 5)],
                [(4, 4), (8, 8), (16, 16), (32, 30), (50, 60)],
                [(32,), (64,), (128,), (256,), (512,)],
                [(0.5, 1.0, 2.0)] * 5,
            )
        ]
        if self.full:  # an 800x1216 batch, three ratios
            configs.append(
                (
                    [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)],
                    [(4, 4), (8, 8), (16, 16), (32, 32), (61, 64)],
                    [(32,), (64,), (128,), (256,), (512,)],
                    [(0.5, 1.0, 2.0)] * 5,
                )
            )
        # ... and random sizes and ratios, none with a half-width within 1e-3 of a rounding tie
        levels = 3 if self.full else 2
        while len(configs) < (3 if self.full else 2):
            sizes = [
                tuple(int(v) for v in torch.randint(8, 400, (2,), generator=self.gen))
                for _ in range(levels)
            ]
            ratios = [
                tuple(round(float(v), 3) for v in 0.25 + 3.75 * torch.rand(2, generator=self.gen))
                for _ in range(levels)
            ]
            half = torch.cat(
                [
                    torch.cat(
                        [
                            (
                                torch.tensor(s, dtype=F64)[None]
                                / torch.tensor(r, dtype=F64).sqrt()[:, None]
                            ).flatten(),
                            (
                                torch.tensor(s, dtype=F64)[None]
                                * torch.tensor(r, dtype=F64).sqrt()[:, None]
                            ).flatten(),
                        ]
                    )
                    / 2
                    for s, r in zip(sizes, ratios)
                ]
            )
            if bool(((half - half.floor() - 0.5).abs() < 1e-3).any()):
                continue
            grid = [
                tuple(int(v) for v in torch.randint(1, 30, (2,), generator=self.gen))
                for _ in range(levels)
            ]
            strides = [
                tuple(int(v) for v in torch.randint(2, 40, (2,), generator=self.gen))
                for _ in range(levels)
            ]
            configs.append((grid, strides, sizes, ratios))
        for dtype in self.dtypes():
            done = []
            with self.case("generate_anchors", dtype, "vs float64 ref") as c:
                for grid, strides, sizes, ratios in configs:
                    label = f"{len(grid)} levels, sizes {sizes[0]}.., ratios {ratios[0]}.."
                    with c.guard(label):
                        ref = ref_anchors(grid, strides, sizes, ratios)
                        got = maskops.generate_anchors(
                            grid,
                            strides,
                            sizes,
                            ratios,
                            dtype=dtype,
                            device=self.device,
                            cache=False,
                        )
                        if dtype in HALF_TYPES:
                            # whole numbers; a half type may round the cell anchor and the
                            # shift separately before adding (torchvision does): two roundings
                            c.close(
                                got, ref, 2 * half_rounding(dtype) * amax(ref), label, dtype=dtype
                            )
                        else:  # whole numbers, exact
                            c.equal(got, ref.to(dtype), label, dtype=dtype)
                        done.append((got, grid, strides, sizes, ratios, label))
            if self.cuda:
                with self.case("generate_anchors", dtype, "vs CPU kernel") as c:
                    for got, grid, strides, sizes, ratios, label in done:
                        c.equal(
                            got,
                            maskops.generate_anchors(
                                grid, strides, sizes, ratios, dtype=dtype, cache=False
                            ),
                            label,
                        )

    # ---- box coding, clipping, small boxes

    def check_box_coding(self):
        weights = [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)]
        if self.full:
            weights.append((1.5, 2.5, 0.7, 3.3))
        clamp = math.log(1000.0 / 16)
        for dtype in self.dtypes():
            done_d, done_e = [], []
            with self.rows(
                ("decode_boxes", dtype, "vs float64 ref"), ("encode_boxes", dtype, "vs float64 ref")
            ) as (dec, enc):
                for j, w in enumerate(weights):
                    n, k = (20000, 1) if self.full and j == 1 else (64, 3)
                    label = f"weights {w}"
                    boxes = random_boxes(self.gen, n, 512.0, 4.0, 200.0).to(dtype)
                    codes = (
                        torch.randn(n, 4 * k, generator=self.gen, dtype=F64)
                        * torch.tensor(w, dtype=F64).repeat(k)
                        * 0.5
                    )
                    codes[:3, 2] = 6.0 * w[2]  # past the clamp
                    codes = codes.to(dtype)
                    ref = ref_decode(codes, boxes, w, clamp)
                    # a coordinate is centre +- size / 2: roundoffs of the row's largest value,
                    # exp's argument carrying up to `clamp` of absolute error
                    scale = (
                        ref.abs().amax(-1, keepdim=True)
                        + boxes.to(F64).abs().amax(-1)[:, None, None]
                    )
                    t = 8 * roundoff(dtype) * (1 + clamp) * scale + half_rounding(dtype) * ref.abs()
                    with dec.guard(label):
                        got = maskops.decode_boxes(self.on(codes), self.on(boxes), w, clamp)
                        dec.close(got, ref, t, label, dtype=dtype)
                        done_d.append((codes, boxes, w, got, t, label))
                    gt = random_boxes(self.gen, n, 512.0, 4.0, 200.0).to(dtype)
                    ref_e = ref_encode(gt, boxes, w)
                    # centre offsets are differences of coordinates, divided by the box size
                    b64 = boxes.to(F64)
                    rel = torch.cat([gt.to(F64), b64], 1).abs().amax(1) / torch.minimum(
                        b64[:, 2] - b64[:, 0], b64[:, 3] - b64[:, 1]
                    )
                    t_e = (
                        16 * roundoff(dtype) * max(w) * (1 + rel)[:, None]
                        + half_rounding(dtype) * ref_e.abs()
                    )
                    with enc.guard(label):
                        got_e = maskops.encode_boxes(self.on(gt), self.on(boxes), w)
                        enc.close(got_e, ref_e, t_e, label, dtype=dtype)
                        done_e.append((gt, boxes, w, got_e, t_e, label))
            if self.cuda:
                with self.case("decode_boxes", dtype, "decode+encode vs CPU kernel") as c:
                    for codes, boxes, w, got, t, label in done_d:
                        c.close(
                            got,
                            maskops.decode_boxes(codes, boxes, w, clamp),
                            2 * t,
                            "decode " + label,
                        )
                    for gt, boxes, w, got, t, label in done_e:
                        c.close(got, maskops.encode_boxes(gt, boxes, w), 2 * t, "encode " + label)
            if self.tv is not None and dtype in (torch.float32, F64):
                from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

                with self.case("decode_boxes", dtype, "decode+encode vs torchvision") as c:
                    for codes, boxes, w, got, t, label in done_d:
                        tv = TVBoxCoder(w, clamp).decode_single(self.on(codes), self.on(boxes))
                        c.close(got.flatten(1), tv, 2 * t.flatten(1), "decode " + label)
                    for gt, boxes, w, got, t, label in done_e:
                        tv = TVBoxCoder(w).encode_single(self.on(gt), self.on(boxes))
                        c.close(got, tv, 2 * t, "encode " + label)
        weights = (2.0, 3.0, 1.5, 0.5)
        self._gradcheck(
            "decode_boxes",
            lambda c, b: maskops.decode_boxes(c, b, weights),
            [
                torch.randn(3, 8, generator=self.gen, dtype=F64),
                random_boxes(self.gen, 3, 64.0, 4.0, 32.0),
            ],
            grad_args=(0, 1),
        )
        self._gradcheck(
            "encode_boxes",
            lambda g, p: maskops.encode_boxes(g, p, weights),
            [
                random_boxes(self.gen, 4, 64.0, 4.0, 32.0),
                random_boxes(self.gen, 4, 64.0, 4.0, 32.0),
            ],
            grad_args=(0, 1),
        )

    def check_clip_small(self):
        for dtype in self.dtypes():
            done_c, done_s = [], []
            with self.rows(
                ("clip_boxes", dtype, "vs float64 ref (exact)"),
                ("remove_small_boxes", dtype, "vs float64 ref (exact)"),
            ) as (c_clip, c_small):
                for h, w in [(300, 400), (37, 1)]:
                    label = f"image {h}x{w}"
                    boxes = (
                        (random_boxes(self.gen, 60, 500.0, 1.0, 200.0) - 100)
                        .to(dtype)
                        .reshape(3, 20, 4)
                    )
                    with c_clip.guard(label):  # clamping involves no rounding
                        got = maskops.clip_boxes(self.on(boxes), (h, w))
                        c_clip.equal(
                            got,
                            ref_clip(boxes.reshape(-1, 4), h, w).to(dtype).reshape(3, 20, 4),
                            label,
                            dtype=dtype,
                        )
                        done_c.append((boxes, (h, w), got, label))
                for min_size in (1e-3, 7.5, 30.0):
                    label = f"min_size {min_size:g}"
                    b = random_boxes(self.gen, 200, 256.0, 0.0, 60.0).to(dtype).to(F64)
                    side = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
                    # sides are computed (rounded) in the boxes' dtype: none near min_size
                    b = b[(side - min_size).abs() > 4 * torch.finfo(dtype).eps * (side + min_size)]
                    ref = (
                        (((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size))
                        .nonzero()
                        .flatten()
                    )
                    boxes = b.to(dtype)
                    with c_small.guard(label):
                        got = maskops.remove_small_boxes(self.on(boxes), min_size)
                        c_small.equal(got, ref, label, dtype=torch.int64)
                        done_s.append((boxes, min_size, got, label))
            if self.cuda:
                with self.case("clip_boxes", dtype, "clip+remove_small vs CPU kernel") as c:
                    for boxes, hw, got, label in done_c:
                        c.equal(got, maskops.clip_boxes(boxes, hw), label)
                    for boxes, min_size, got, label in done_s:
                        c.equal(got, maskops.remove_small_boxes(boxes, min_size), label)
        b = random_boxes(self.gen, 6, 60.0, 1.0, 30.0) - 10
        b = torch.where((b - b.round()).abs() < 1e-2, b + 0.1, b)  # no coordinate at a bound (kink)
        self._gradcheck(
            "clip_boxes", lambda t: maskops.clip_boxes(t, (37, 41)), [b], grad_args=(0,)
        )

    # ---- RPN proposals

    def check_rpn(self):
        # image sizes, padded batch size, strides, pre_nms_top_n, post_nms_top_n
        configs = [([(120, 150), (96, 160)], (128, 160), [4, 8], 150, 80)]
        if self.full:
            configs += [
                ([(120, 150), (96, 160)], (128, 160), [4, 8, 16], 100, 60),
                ([(800, 800), (752, 800)], (800, 800), [4, 8, 16, 32, 64], 1000, 1000),
            ]
        nms_thr, min_size = 0.7, 1e-3
        for dtype in (torch.float32, F64):
            done = []
            with self.case("rpn_proposals", dtype, "vs float64 pipeline ref") as c:
                for ci, (image_sizes, (pad_h, pad_w), strides, pre, post) in enumerate(configs):
                    grid = [((pad_h + s - 1) // s, (pad_w + s - 1) // s) for s in strides]
                    anchors = ref_anchors(
                        grid,
                        [(s, s) for s in strides],
                        [(8 * s,) for s in strides],
                        [(0.5, 1.0, 2.0)] * len(strides),
                    )
                    per_level = [h * w * 3 for h, w in grid]
                    a, b = anchors.shape[0], len(image_sizes)
                    score_thr = 0.3 if ci == 1 else 0.0
                    # distinct logits (a shuffled grid): the top-k and the score order are clear
                    obj = torch.stack(
                        [
                            torch.linspace(-4, 4, a, dtype=F64)[
                                torch.randperm(a, generator=self.gen)
                            ]
                            for _ in range(b)
                        ]
                    ).to(dtype)
                    deltas = (torch.randn(b, a, 4, generator=self.gen, dtype=F64) * 0.3).to(dtype)
                    anc = anchors.to(dtype)
                    args = (image_sizes, pre, post, nms_thr, score_thr, min_size, per_level)
                    label = (
                        f"{b} images {pad_h}x{pad_w}, {len(strides)} levels, pre {pre} "
                        f"post {post} score>={score_thr}"
                    )
                    with c.guard(label):
                        boxes, scores = maskops.rpn_proposals(
                            self.on(obj), self.on(deltas), self.on(anc), *args
                        )
                        close_calls = sum(
                            self._check_proposals(
                                c,
                                obj[i],
                                deltas[i],
                                anc,
                                image_sizes[i],
                                per_level,
                                pre,
                                post,
                                nms_thr,
                                score_thr,
                                min_size,
                                boxes[i],
                                scores[i],
                                f"image {i} of {label}",
                            )
                            for i in range(b)
                        )
                        done.append((obj, deltas, anc, args, boxes, scores, close_calls, label))
            if self.cuda:
                with self.case("rpn_proposals", dtype, "vs CPU kernel") as c:
                    for obj, deltas, anc, args, boxes, scores, close_calls, label in done:
                        cb, cs = maskops.rpn_proposals(obj, deltas, anc, *args)
                        for g_b, g_s, r_b, r_s in zip(boxes, scores, cb, cs):
                            t_b = 16 * roundoff(dtype) * (1 + math.log(1000 / 16)) * (1 + amax(r_b))
                            t_s = tolerance(dtype, 1.0, 16)
                            same = (
                                g_b.shape == r_b.shape
                                and bool(((g_b.cpu().to(F64) - r_b.to(F64)).abs() <= t_b).all())
                                and bool(((g_s.cpu().to(F64) - r_s.to(F64)).abs() <= t_s).all())
                            )
                            if not same and close_calls:
                                # both were held to the reference above; they may part where
                                # an IoU or a size was within the margin of its threshold
                                c.note(
                                    f"{label}: differs from the CPU kernel after one of "
                                    f"{close_calls} decisions too close to call (both agree "
                                    "with the reference)"
                                )
                                continue
                            c.close(g_b, r_b, t_b, label)
                            c.close(g_s, r_s, t_s, label)

    def _check_proposals(
        self,
        c: Case,
        obj,
        deltas,
        anchors,
        image_hw,
        per_level,
        pre,
        post,
        nms_thr,
        score_thr,
        min_size,
        got_boxes,
        got_scores,
        label,
    ) -> int:
        """One image's proposals against the float64 pipeline (per level top-k, decode, clip,
        size and score filters, per-level greedy NMS, the best ``post``). A decision within
        a margin of its threshold may go either way; returns how many were that close."""
        dtype = obj.dtype
        h, w = image_hw
        idx, lvl, start = [], [], 0
        for level, n in enumerate(per_level):
            idx.append(torch.topk(obj[start : start + n].to(F64), min(pre, n)).indices + start)
            lvl += [level] * len(idx[-1])
            start += n
        idx, lvl = torch.cat(idx), torch.tensor(lvl)
        score = torch.sigmoid(obj[idx].to(F64))
        boxes = ref_clip(
            ref_decode(deltas[idx], anchors[idx], (1.0, 1.0, 1.0, 1.0), math.log(1000.0 / 16))[
                :, 0
            ],
            h,
            w,
        )
        side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        m_side = 1e-4 * (1 + boxes.abs().amax(1))
        passes = (side >= min_size + m_side) & (score >= score_thr + 1e-6)
        fails = (side < min_size - m_side) | (score < score_thr - 1e-6)
        close_calls = int((~passes & ~fails).sum())
        if got_scores.dtype != dtype or got_boxes.dtype != deltas.dtype:
            c.fail(
                f"{label}: dtypes {got_boxes.dtype} / {got_scores.dtype}, "
                f"expected {deltas.dtype} / {dtype}"
            )
        gs = got_scores.detach().cpu().to(F64)
        if tuple(got_boxes.shape) != (gs.shape[0], 4) or gs.shape[0] > post:
            c.fail(
                f"{label}: {tuple(got_boxes.shape)} boxes, {tuple(gs.shape)} scores "
                f"(at most {post})"
            )
            return close_calls
        if bool((gs[1:] > gs[:-1]).any()):
            c.fail(f"{label}: scores are not in decreasing order")
        # each returned proposal is the candidate with its score (scores are far apart)
        match = (gs[:, None] - score[None, :]).abs().argmin(1)
        if len(set(match.tolist())) != len(match):
            c.fail(f"{label}: two proposals have the score of one candidate")
            return close_calls
        c.close(gs, score[match], tolerance(dtype, 1.0, 16), f"{label} scores")
        scale = 1 + boxes[match].abs().amax(1, keepdim=True)
        c.close(
            got_boxes,
            boxes[match],
            16 * roundoff(dtype) * (1 + math.log(1000 / 16)) * scale,
            f"{label} boxes",
        )
        # greedy NMS per level over the candidates down to the last one returned
        returned = set(match.tolist())
        lowest = float(score[match].min()) if len(match) == post else -1.0
        kept: Dict[int, List[int]] = {}
        margin = 1e-3
        for j in torch.sort(score, descending=True).indices.tolist():
            if float(score[j]) < lowest:
                break
            others = kept.get(int(lvl[j]), [])
            ious = ref_iou(boxes[j : j + 1], boxes[others])[0]
            surely, maybe = (
                bool((ious > nms_thr + margin).any()),
                bool((ious > nms_thr - margin).any()),
            )
            close_calls += int(maybe != surely)
            what = f"{label}: candidate {j} (level {int(lvl[j])}, score {float(score[j]):.6f})"
            if j in returned:
                if bool(fails[j]) or surely:
                    c.fail(
                        f"{what} was returned but "
                        + (
                            "the size / score filter removes it"
                            if bool(fails[j])
                            else "a kept box of its level suppresses it"
                        )
                    )
                    return close_calls
                kept.setdefault(int(lvl[j]), []).append(j)
            elif bool(passes[j]) and not maybe:
                c.fail(f"{what} is missing: it passes the filters and no kept box suppresses it")
                return close_calls
        return close_calls

    # ---- mask paste and RLE

    def check_paste_masks(self):
        configs = [(12, 1, 28, 1, (100, 130))]  # masks N x C x M x M, padding, image
        if self.full:
            configs += [(7, 2, 14, 2, (64, 51)), (5, 1, 28, 0, (90, 90))]
        for dtype in self.dtypes():
            done = []
            with self.case("paste_masks", dtype, "vs float64 ref") as c:
                for n, ch, m, pad, (h, w) in configs:
                    masks = torch.rand(n, ch, m, m, generator=self.gen, dtype=F64).to(dtype)

                    def make(k, n=n, h=h, w=w):
                        k = n if k is None else k
                        lo = torch.tensor([w * 0.1, h * 0.1], dtype=F64)
                        xy = (
                            rand64(self.gen, k, 2) * torch.tensor([w * 1.2, h * 1.2], dtype=F64)
                            - lo
                        )
                        wh = 0.3 + rand64(self.gen, k, 2) * torch.tensor(
                            [w * 0.6, h * 0.6], dtype=F64
                        )
                        return torch.cat([xy, xy + wh], 1).to(torch.float32).to(F64)

                    # the grown box is truncated to whole pixels: no coordinate near a whole number
                    boxes = redraw(
                        make,
                        lambda bx, m=m, pad=pad: near_int(expanded_boxes(bx, m, pad), 1e-3).any(1),
                    )
                    boxes = boxes.to(torch.float32)
                    ref = ref_paste(masks, boxes, h, w, pad)
                    # resampling positions carry roundoff u * (padded mask size); values in [0, 1]
                    t = tolerance(dtype, 1 + m + 2 * pad, 8, 1.0)
                    label = f"{n}x{ch}x{m}x{m} pad {pad} -> {h}x{w}"
                    with c.guard(label):
                        got = maskops.paste_masks(
                            self.on(masks), self.on(boxes), (h, w), threshold=None, padding=pad
                        )
                        c.close(got, ref, t, label, dtype=dtype)
                        done.append((masks, boxes, (h, w), pad, got, t, label))
                    for thr, u8 in ((0.5, False), (0.3, True)):
                        lab = f"{label} >= {thr}"
                        with c.guard(lab):
                            got_t = maskops.paste_masks(
                                self.on(masks),
                                self.on(boxes),
                                (h, w),
                                threshold=thr,
                                padding=pad,
                                as_uint8=u8,
                            )
                            want = torch.uint8 if u8 else torch.bool
                            if got_t.shape != ref.shape or got_t.dtype != want:
                                c.fail(
                                    f"{lab}: {got_t.dtype} {tuple(got_t.shape)}, "
                                    f"expected {want} {tuple(ref.shape)}"
                                )
                                continue
                            sure = (
                                ref - thr
                            ).abs() > t  # a pixel at the threshold may go either way
                            c.equal(got_t.cpu()[sure], (ref >= thr).to(want)[sure], lab)
            if self.cuda:
                with self.case("paste_masks", dtype, "vs CPU kernel") as c:
                    for masks, boxes, hw, pad, got, t, label in done:
                        c.close(
                            got,
                            maskops.paste_masks(masks, boxes, hw, threshold=None, padding=pad),
                            2 * t,
                            label,
                        )
            if self.tv is not None and dtype in (torch.float32, F64):
                from torchvision.models.detection.roi_heads import paste_masks_in_image

                with self.case("paste_masks", dtype, "vs torchvision") as c:
                    for masks, boxes, (h, w), pad, got, t, label in done:
                        if masks.shape[1] != 1:  # torchvision pastes one channel
                            continue
                        # and fails on a box that ends up wholly outside the image: leave those out
                        e = expanded_boxes(boxes, masks.shape[-1], pad).trunc()
                        inside = (
                            (e[:, 2] + 1 >= e[:, 0].clamp(min=0))
                            & (e[:, 0] <= w)
                            & (e[:, 3] + 1 >= e[:, 1].clamp(min=0))
                            & (e[:, 1] <= h)
                        )
                        tv = paste_masks_in_image(
                            self.on(masks[inside]), self.on(boxes[inside].to(dtype)), (h, w), pad
                        )
                        c.close(got[self.on(inside)], tv, 2 * t, label)
        if self.cuda and self.full:
            self._large_paste()

    def _large_paste(self):
        """100 masks into an 800x800 image on the GPU against the CPU kernel."""
        n, m, h, w = 100, 28, 800, 800
        with self.case("paste_masks", torch.float32, f"{n} masks, {h}x{w} vs CPU kernel") as c:
            masks = torch.rand(n, 1, m, m, generator=self.gen)

            def make(k):
                k = n if k is None else k
                xy = rand64(self.gen, k, 2) * (w * 0.9)
                return torch.cat([xy, xy + 5 + rand64(self.gen, k, 2) * 300], 1).float().to(F64)

            boxes = redraw(make, lambda bx: near_int(expanded_boxes(bx, m, 1), 1e-3).any(1)).float()
            t = tolerance(torch.float32, 1 + m + 2, 8)
            ref = maskops.paste_masks(masks, boxes, (h, w), threshold=None)
            c.close(
                maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=None),
                ref,
                t,
                "float",
            )
            got = maskops.paste_masks(self.on(masks), self.on(boxes), (h, w), threshold=0.5).cpu()
            sure = (ref - 0.5).abs() > t
            c.equal(got[sure], (ref >= 0.5)[sure], ">= 0.5")

    def check_rle(self):
        with self.case("masks_to_rle", "bool/uint8", "vs reference encoder (exact)") as c:
            shapes = [(6, 37, 23), (3, 1, 9)] + ([(4, 64, 80), (2, 5, 1)] if self.full else [])
            for n, h, w in shapes:
                noise = torch.rand(n, h, w, generator=self.gen) < 0.5
                blob = torch.zeros(n, h, w, dtype=torch.bool)
                blob[:, h // 4 : 3 * h // 4 + 1, w // 3 : 2 * w // 3 + 1] = True
                m = torch.where(torch.arange(n)[:, None, None] % 2 == 0, noise, blob)
                m[0] = False  # empty
                if n > 2:
                    m[1] = True  # full
                for kind in ("bool", "uint8"):
                    x = (
                        m
                        if kind == "bool"
                        else m.to(torch.uint8)
                        * torch.randint(1, 256, (n, h, w), generator=self.gen, dtype=torch.uint8)
                    )
                    label = f"{n}x{h}x{w} {kind}"
                    c.row.cases += 1
                    with c.guard(label):
                        got = maskops.masks_to_rle(self.on(x))
                        if len(got) != n:
                            c.fail(f"{label}: {len(got)} encodings for {n} masks")
                            continue
                        for i, r in enumerate(got):
                            want = {"size": [h, w], "counts": ref_rle(m[i])}
                            if r != want:
                                c.fail(f"{label}: mask {i}: {str(r)[:70]} != {str(want)[:70]}")
                                break
            c.row.max_error, c.row.tolerance = 0.0, 0.0

    # ---- opcheck

    def check_opcheck(self):
        """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
        ops, g = torch.ops.maskops, self.gen

        def grad(t):
            return t.requires_grad_()

        x = torch.randn(2, 3, 9, 11, generator=g, dtype=F64)
        rois = torch.cat(
            [torch.randint(0, 2, (6, 1), generator=g).to(F64), random_boxes(g, 6, 36.0, 2.0, 18.0)],
            1,
        )
        levels = [
            torch.randn(2, 3, 16, 16, generator=g, dtype=F64),
            torch.randn(2, 3, 8, 8, generator=g, dtype=F64),
        ]
        boxes = random_boxes(g, 50, 100.0).to(torch.float32)
        scores = torch.rand(50, generator=g)
        idxs = torch.randint(0, 3, (50,), generator=g)
        codes = torch.randn(50, 8, generator=g, dtype=F64)
        masks = torch.rand(4, 1, 7, 7, generator=g)
        anchors = ref_anchors(
            [(6, 8), (3, 4)], [(4, 4), (8, 8)], [(8,), (16,)], [(0.5, 1.0, 2.0)] * 2
        ).float()
        per_level = [6 * 8 * 3, 3 * 4 * 3]
        samples = {
            "roi_align": [
                (ops.roi_align, (grad(x), rois, 0.25, 3, 4, 2, True)),
                (
                    ops.roi_align,
                    (
                        x.float().contiguous(memory_format=torch.channels_last),
                        rois.float(),
                        0.5,
                        2,
                        3,
                        -1,
                        False,
                    ),
                ),
            ],
            "_roi_align_backward": [
                (
                    ops._roi_align_backward,
                    (
                        torch.randn(6, 3, 4, 5, generator=g, dtype=F64),
                        rois,
                        0.25,
                        4,
                        5,
                        2,
                        3,
                        9,
                        11,
                        2,
                        True,
                    ),
                )
            ],
            "multiscale_roi_align": [
                (
                    ops.multiscale_roi_align,
                    ([grad(t) for t in levels], rois, [0.25, 0.125], 3, 3, 2, False, 16.0, 4.0, 2),
                )
            ],
            "_multiscale_roi_align_backward": [
                (
                    ops._multiscale_roi_align_backward,
                    (
                        torch.randn(6, 3, 3, 3, generator=g, dtype=F64),
                        rois,
                        [0.25, 0.125],
                        3,
                        3,
                        2,
                        3,
                        [16, 8],
                        [16, 8],
                        2,
                        False,
                        16.0,
                        4.0,
                        2,
                    ),
                )
            ],
            "nms": [
                (ops.nms, (boxes, scores, 0.5)),
                (ops.nms, (boxes.half(), scores, 0.5, 0.2, 10)),
            ],
            "batched_nms": [(ops.batched_nms, (boxes, scores, idxs, 0.5))],
            "box_iou": [(ops.box_iou, (grad(boxes[:7].double()), grad(boxes[3:20].double())))],
            "box_area": [(ops.box_area, (grad(boxes.double()),))],
            "generate_anchors": [
                (
                    ops.generate_anchors,
                    (
                        torch.tensor([32.0, 64.0, 96.0]),
                        torch.tensor([0.5, 1.0, 2.0, 1.0]),
                        [2, 1],
                        [3, 1],
                        [5, 7, 3, 4],
                        [4, 4, 8, 9],
                        torch.float32,
                    ),
                )
            ],
            "decode_boxes": [
                (ops.decode_boxes, (grad(codes), grad(boxes.double()), [10.0, 10.0, 5.0, 5.0], 4.0))
            ],
            "encode_boxes": [
                (
                    ops.encode_boxes,
                    (grad(boxes.double()), grad(boxes.flip(0).double()), [1.0, 1.0, 1.0, 1.0]),
                )
            ],
            "clip_boxes": [(ops.clip_boxes, (grad((boxes - 20).double()), 60, 70))],
            "remove_small_boxes": [(ops.remove_small_boxes, (boxes, 30.0))],
            "rpn_proposals": [
                (
                    ops.rpn_proposals,
                    (
                        torch.randn(2, sum(per_level), generator=g),
                        torch.randn(2, sum(per_level), 4, generator=g) * 0.2,
                        anchors,
                        [24, 32, 20, 30],
                        40,
                        20,
                        0.7,
                        0.0,
                        1e-3,
                        per_level,
                    ),
                )
            ],
            "paste_masks": [
                (ops.paste_masks, (masks, boxes[:4], 40, 50, 1, None, False)),
                (ops.paste_masks, (masks, boxes[:4], 40, 50, 1, 0.5, False)),
            ],
        }
        if not self.cuda:  # a host-side op: CUDA masks are encoded from a CPU copy
            samples["_masks_to_rle"] = [
                (ops._masks_to_rle, (torch.rand(3, 9, 7, generator=g) < 0.5,))
            ]

        def move(a):
            if isinstance(a, torch.Tensor):
                return self.leaf(a) if a.requires_grad else a.to(self.device)
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                return [move(t) for t in a]
            return a

        for name, entries in samples.items():
            with self.case(name, "-", "opcheck") as c:
                for op, args in entries:
                    with c.guard(f"{name}{tuple(getattr(a, 'shape', a) for a in args[:2])}"):
                        torch.library.opcheck(op.default, tuple(move(a) for a in args))
                        c.row.cases += 1


# group name -> (method, ops it covers)
GROUPS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "roi_align": ("check_roi_align", ("roi_align",)),
    "multiscale_roi_align": ("check_multiscale_roi_align", ("multiscale_roi_align",)),
    "nms": ("check_nms", ("nms", "batched_nms")),
    "boxes": ("check_boxes", ("box_iou", "box_area")),
    "anchors": ("check_anchors", ("generate_anchors",)),
    "box_coding": ("check_box_coding", ("encode_boxes", "decode_boxes")),
    "clip": ("check_clip_small", ("clip_boxes", "remove_small_boxes")),
    "rpn": ("check_rpn", ("rpn_proposals",)),
    "paste_masks": ("check_paste_masks", ("paste_masks",)),
    "rle": ("check_rle", ("masks_to_rle",)),
    "opcheck": ("check_opcheck", ("opcheck",)),
}


def select_groups(ops: Optional[Sequence[str]]) -> List[str]:
    if not ops:
        return list(GROUPS)
    wanted = {o.strip() for o in ops if o.strip()}
    known = {name for name in GROUPS} | {op for _, covered in GROUPS.values() for op in covered}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [g for g, (_, covered) in GROUPS.items() if g in wanted or wanted & set(covered)]
