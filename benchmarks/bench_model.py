"""End-to-end Mask R-CNN inference: models/ (on maskops) vs stock torchvision, same run.

    python -m benchmarks.bench_model [--reps 5] [--size 800] [--threads 2] [--variants]
                                     [--json PATH]

Both models get the same seeded random weights (torchvision's ``maskrcnn_resnet50_fpn(
weights=None)`` state_dict loaded into ours) and the same seeded 800x800 image, float32.
Ours runs as ``build_mask_rcnn`` gives it, in eval mode: its inference runs rewritten copies
of the backbone and heads (batch norms folded, fused, channels-last). Before any
timing, every model is compared with torchvision stage by stage (models/testing/equivalence.py) and
the run refuses to report a speed for one that differs.
The two models are timed alternately, rep by rep, so that a change of machine load hits
both; medians (and the best rep, the least disturbed by other load) are reported, with a
per-stage breakdown (medians). ``--variants`` adds ours rewritten in place by
``optimize_for_inference()``, ours with ``fast_inference=False`` (the modules as built), and
torchvision with channels-last weights (its convolutions then run channels-last).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Dict, Optional

import torch
import torchvision

import maskops
from benchmarks.common import machine, measure_interleaved
from benchmarks.efficiency import PeakProbe, conv_peak_gflops, forward_gflops, share
from benchmarks.onnxruntime_peer import load_peer
from maskops import cpu
from models import build_mask_rcnn
from models.evaluation import compare_detections
from models.testing.equivalence import compare_stages, record_stages

STAGE_NAMES = {
    "transform": "1 input (normalise, resize, batch)",
    "backbone": "2 backbone (ResNet-FPN)",
    "rpn": "3 region proposal network",
    "roi_align": "4 RoI Align (box + mask)",
    "box_head": "5 box head + postprocess",
    "mask_head": "6 mask head",
    "paste": "6b mask paste to image size",
}


class TorchvisionStages:
    """Times torchvision's Mask R-CNN stages with forward hooks (the same stage split as
    ours: the box stage is what roi_heads spends outside RoI Align and the mask head)."""

    def __init__(self, model) -> None:
        self.times: Dict[str, float] = defaultdict(float)
        self._start: Dict[str, float] = {}
        rh = model.roi_heads
        parts = {
            "transform": model.transform,
            "backbone": model.backbone,
            "rpn": model.rpn,
            "roi_heads": rh,
            "roi_align_box": rh.box_roi_pool,
            "roi_align_mask": rh.mask_roi_pool,
            "mask_head": rh.mask_head,
            "mask_predictor": rh.mask_predictor,
        }
        for name, m in parts.items():
            m.register_forward_pre_hook(self._pre(name))
            m.register_forward_hook(self._post(name))
        post = model.transform.postprocess

        def timed_postprocess(*args, **kwargs):
            t = time.perf_counter()
            out = post(*args, **kwargs)
            self.times["paste"] += time.perf_counter() - t
            return out

        model.transform.postprocess = timed_postprocess

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.times[name] += time.perf_counter() - self._start[name]

        return hook

    def take(self) -> Dict[str, float]:
        t = self.times
        roi_align = t["roi_align_box"] + t["roi_align_mask"]
        mask = t["mask_head"] + t["mask_predictor"]
        out = {
            "transform": t["transform"],
            "backbone": t["backbone"],
            "rpn": t["rpn"],
            "roi_align": roi_align,
            "box_head": t["roi_heads"] - roi_align - mask,
            "mask_head": mask,
            "paste": t["paste"],
        }
        self.times = defaultdict(float)
        return out


BF16 = "maskops model, bfloat16 weights"
ORT = "onnxruntime, torchvision's ONNX export"


def bf16_plan(device: str, bf16: Optional[bool] = None):
    """``(time bfloat16 weights?, why or why not)``; None: where bfloat16 is faster than
    float32 (a GPU, or a CPU with bfloat16 dot-product units)."""
    if bf16 is False:
        return False, "not asked for"
    why = cpu.features().missing_for(torch.bfloat16) if device == "cpu" else None
    if bf16 is None and why:
        return False, (
            f"not timed: {why} on this CPU, so bfloat16 is slower than float32 "
            f"here (torch's portable kernels)"
        )
    return True, "measured" if why is None else f"measured, though slower than float32 ({why})"


def run_model(
    size: int = 800,
    reps: int = 5,
    variants: bool = False,
    seed: int = 0,
    device: str = "cpu",
    bf16: Optional[bool] = None,
    onnxruntime: bool = True,
    quick_peak: bool = False,
    native_size: bool = False,
) -> dict:
    """``bf16``: also time bfloat16 weights (None: where bfloat16 is faster than float32,
    i.e. on a GPU or a CPU with bfloat16 dot-product units; the result's ``bf16`` then says
    why not). ``native_size``: every model runs the image at ``size`` instead of resizing it
    to the default 800 (quick runs)."""
    bf16, bf16_note = bf16_plan(device, bf16)
    resize = dict(min_size=size, max_size=size) if native_size else {}
    torch.manual_seed(seed)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **resize
    )
    tv.eval()

    def ours(**kw):
        model = build_mask_rcnn("resnet50", **resize, **kw)
        model.load_state_dict(tv.state_dict(), strict=True)
        return model.eval()

    # As a user gets it: eval-mode inference runs the rewritten (fast inference) copies.
    models = {"maskops model": ours()}
    if variants:
        models["maskops model, optimize_for_inference()"] = ours().optimize_for_inference()
        models["maskops model, fast_inference=False"] = ours(fast_inference=False)
        tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
        models["torchvision channels_last"] = tv_cl
    if bf16:  # torchvision cannot run bfloat16 on the CPU (its roi_align refuses it)
        models[BF16] = ours().optimize_for_inference(dtype=torch.bfloat16)
    models["torchvision"] = tv
    models = {n: m.to(device) for n, m in models.items()}
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    peer_note = ""
    if onnxruntime and device == "cpu":
        peer, peer_note = load_peer(tv, image, seed, torch.get_num_threads())
        if peer is not None:
            models[ORT] = peer

    def call(name, model):
        out = model([image])[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    # The maskops models run their inference in maskops' CPU buffer cache
    # (maskops.cpu_cache_for_torch): each keeps 0.3-0.55 GB of activations mapped between
    # calls. Alternated rep by rep in one process, three of them would evict each other's
    # blocks from the default 1 GB limit, which a user running one model never sees; the limit
    # is raised for the run so that each is timed in its own steady state.
    cache_limit = maskops.cpu_cache_info()["limit_bytes"]
    maskops.set_cpu_cache_limit(max(cache_limit, 3 << 30))
    try:
        result = _timed(
            models, tv, image, call, device, reps, variants, size, quick_peak, peer_note
        )
        result["bf16"] = bf16_note
        return result
    finally:
        maskops.set_cpu_cache_limit(cache_limit)


def _timed(models, tv, image, call, device, reps, variants, size, quick_peak, peer_note) -> dict:
    with torch.inference_mode():
        outputs = {name: call(name, m) for name, m in models.items()}  # also the warm-up
        # Stage by stage against torchvision in float64 (models/testing/equivalence.py): no speed is
        # reported for a model whose stages differ from it beyond the float32 rounding
        # measured here (torchvision in float32 on this device, TF32 settings included), or
        # whose proposals and detections differ other than at a decision boundary.
        truth = record_stages(copy.deepcopy(tv).double(), [image.double()])
        spread = record_stages(tv, [image], forced_by=truth)
        checks = {}
        for name, m in models.items():
            if name == "torchvision":
                continue
            if name == BF16:
                # bfloat16 rounds far beyond float32's spread by design: nothing to compare
                # stage by stage against float32 rounding.
                checks[name] = "not compared (bfloat16 weights round beyond float32's spread)"
                continue
            if name == ORT:
                # No stages to record: its detections against torchvision eager's, refusing a
                # speed for a broken export (fewer than 90 % matched).
                d = compare_detections(
                    outputs["torchvision"], outputs[name], box_tol=0.1, score_tol=1e-3
                )
                if len(d.pairs) < 0.9 * len(outputs["torchvision"]["boxes"]):
                    raise AssertionError(
                        f"{name}: detections differ from torchvision eager's "
                        f"({d.summary()}); refusing to report its speed"
                    )
                checks[name] = d.summary()
                continue
            report = compare_stages(truth, spread, record_stages(m, [image], forced_by=truth))
            if not report.ok:
                raise AssertionError(
                    f"{name}: stages differ from torchvision's, refusing to "
                    f"report its speed:\n{report.summary()}"
                )
            checks[name] = report.brief()
        del truth, spread

        # The best probe shape now; the peak itself sampled between the reps (PeakProbe).
        kinds = {"float32": torch.float32}
        if BF16 in models:
            kinds["bfloat16"] = torch.bfloat16
        peaks = {k: conv_peak_gflops(device, dt, quick_peak) for k, dt in kinds.items()}
        probes = {k: PeakProbe(device, dt, peaks[k]["shape"]) for k, dt in kinds.items()}
        tv_stages = TorchvisionStages(tv)
        if variants:
            tvcl_stages = TorchvisionStages(models["torchvision channels_last"])
        stages = defaultdict(lambda: defaultdict(list))

        def timed(name, m):
            def once():
                recorder = None
                if name.startswith("maskops"):
                    with m.record_stages() as recorder:
                        call(name, m)
                else:
                    call(name, m)
                st = (
                    recorder.times
                    if recorder is not None
                    else {}
                    if name == ORT
                    else (tvcl_stages if "channels_last" in name else tv_stages).take()
                )
                for k, v in st.items():
                    stages[name][k].append(v)

            return once

        def sample_peaks():
            for probe in probes.values():
                for _ in range(2):  # (the first after a model run may find caches cold)
                    probe.sample()

        # the outputs above were the warm-up
        timings = measure_interleaved(
            [timed(n, m) for n, m in models.items()], device, reps, warmup=0, between=sample_peaks
        )
        totals = {n: [v / 1e3 for v in t.samples_ms] for n, t in zip(models, timings)}
    med = {n: statistics.median(v) * 1e3 for n, v in totals.items()}
    # Work and the machine's practical peak, measured in the same run (benchmarks/efficiency.py).
    gflop = forward_gflops(tv, [image])
    for k, probe in probes.items():
        peaks[k] = {
            "gflops": probe.gflops(),
            "shape": peaks[k]["shape"],
            "at_start_gflops": peaks[k]["gflops"],
            "samples": len(probe.rates),
            "best_gflops": max(probe.rates + [peaks[k]["gflops"]]),
        }
    best = {n: min(v) * 1e3 for n, v in totals.items()}
    # The share twice: median against median (the same drift on both sides), and the least
    # disturbed rep against the least disturbed peak sample (bursts of load on neither side).
    efficiency = {}
    for n, v in med.items():
        kind = "bfloat16" if n == BF16 else "float32"
        efficiency[n] = {
            **share(gflop["total"], v, peaks[kind]["gflops"]),
            "peak": kind,
            "best_share": share(gflop["total"], best[n], peaks[kind]["best_gflops"])["share"],
        }
    return {
        "machine": machine(),
        "image": f"1 x 3 x {size} x {size}",
        "reps": reps,
        "detections": {n: len(o["boxes"]) for n, o in outputs.items()},
        "checks": checks,
        "end_to_end_ms": med,
        "speedup_vs_torchvision": {n: med["torchvision"] / v for n, v in med.items()},
        "best_ms": best,
        "best_speedup_vs_torchvision": {n: best["torchvision"] / v for n, v in best.items()},
        "stages_ms": {
            n: {k: statistics.median(v) * 1e3 for k, v in s.items()} for n, s in stages.items()
        },
        "samples_ms": {n: [round(x * 1e3, 1) for x in v] for n, v in totals.items()},
        "gflop": gflop,
        "peaks": peaks,
        "efficiency": efficiency,
        "onnxruntime": peer_note or "measured",
    }


def run(device: str = "cpu", quick: bool = False):
    """The suite's entry point: end-to-end inference as rows of the common table, float32 and
    bfloat16 weights against torchvision's float32, with their share of the practical peak."""
    from benchmarks.common import Row, Timing

    r = run_model(
        size=256 if quick else 800,
        reps=2 if quick else 5,
        device=device,
        quick_peak=quick,
        native_size=quick,
    )
    q = lambda v: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3  # noqa: E731
    timing = {
        n: Timing(
            r["end_to_end_ms"][n],
            q(r["samples_ms"][n])[2] - q(r["samples_ms"][n])[0],
            r["reps"],
            r["samples_ms"][n],
        )
        for n in r["end_to_end_ms"]
    }
    eff = r["efficiency"]
    flops = r["gflop"]["total"] * 1e9

    def note(name):
        e = eff[name]
        return (
            f"{e['gflops']:.0f} GFLOP/s = {100 * e['share']:.0f} % of the {e['peak']} peak "
            f"(torchvision {100 * eff['torchvision']['share']:.0f} % of float32's)"
        )

    case = f"{r['image']}, same weights, {r['gflop']['total']:.0f} GFLOP"
    rows = [
        Row(
            "Mask R-CNN R50-FPN inference",
            device,
            case + ", float32",
            timing["maskops model"],
            timing["torchvision"],
            note="checked stage by stage; " + note("maskops model"),
            flops=flops,
        )
    ]
    if BF16 in timing:
        rows.append(
            Row(
                "Mask R-CNN R50-FPN inference",
                device,
                case + ", bfloat16 weights vs torchvision float32",
                timing[BF16],
                timing["torchvision"],
                note=note(BF16),
                flops=flops,
            )
        )
    else:
        rows[0].note += f"; no bfloat16 row: {r['bf16']}"
    if ORT in timing:  # the peer column holds onnxruntime here
        rows.append(
            Row(
                "Mask R-CNN R50-FPN inference",
                device,
                case + ", float32, vs onnxruntime on torchvision's ONNX export (same threads)",
                timing["maskops model"],
                timing[ORT],
                note=f"onnxruntime {100 * eff[ORT]['share']:.0f} % of the float32 peak",
            )
        )
    else:
        rows[0].note += f"; no onnxruntime row: {r['onnxruntime']}"
    return rows


def efficiency_table(r: dict) -> str:
    """Markdown: each model's GFLOP/s and share of the practical peak."""
    p = r["peaks"]
    lines = [
        f"Work: {r['gflop']['total']:.1f} GFLOP per forward (FlopCounterMode on "
        f"torchvision's model: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["gflop"].items() if k != "total")
        + ").",
        f"Practical peak (best 3x3 channels-last convolution, same run; median of "
        f"{p['float32'].get('samples', 1)} samples taken between the timed reps): float32 "
        f"{p['float32']['gflops']:.0f} GFLOP/s ({p['float32']['shape']}; "
        f"{p['float32'].get('at_start_gflops', p['float32']['gflops']):.0f} at the start), "
        + (
            f"bfloat16 {p['bfloat16']['gflops']:.0f} GFLOP/s ({p['bfloat16']['shape']}; "
            f"{p['bfloat16'].get('at_start_gflops', p['bfloat16']['gflops']):.0f} at the "
            f"start; "
            if "bfloat16" in p
            else "bfloat16 not measured ("
        )
        + f"bfloat16 units: {r['machine'].get('cpu_bf16', 'not recorded')}).",
        "",
        "| model | ms | GFLOP/s | share of the practical peak | best rep / best peak sample |",
        "|---|---|---|---|---|",
    ]
    for n, e in r["efficiency"].items():
        best = f"{100 * e['best_share']:.0f} %" if "best_share" in e else "-"
        lines.append(
            f"| {n} | {r['end_to_end_ms'][n]:.0f} | {e['gflops']:.0f} | "
            f"{100 * e['share']:.0f} % ({e['peak']}) | {best} |"
        )
    return "\n".join(lines)


def report(r: dict) -> str:
    names = list(r["end_to_end_ms"])
    lines = [
        f"Machine: {r['machine']['cpu']}, {r['machine']['cpu_threads']} threads, "
        f"torch {r['machine']['torch']}, torchvision {r['machine'].get('torchvision')}",
        f"Input: {r['image']} float32, {r['reps']} reps (medians), detections: {r['detections']}",
        "",
    ]
    for n, c in r["checks"].items():
        lines.append(f"- {n} vs torchvision: {c}")
    lines += [
        "",
        "| model | end to end ms, median | speed-up | best of reps ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(
            f"| {n} | {r['end_to_end_ms'][n]:.0f} | "
            f"**{r['speedup_vs_torchvision'][n]:.2f}x** | {r['best_ms'][n]:.0f} | "
            f"{r['best_speedup_vs_torchvision'][n]:.2f}x |"
        )
    lines += ["", efficiency_table(r)]
    lines += [
        "",
        "| stage | " + " | ".join(f"{n} ms" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k, label in STAGE_NAMES.items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{r['stages_ms'].get(n, {}).get(k, 0.0):.0f}" for n in names)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = run_model(a.size, a.reps, a.variants)
    print(report(r))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
