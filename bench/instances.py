"""Instances: how well frame mode finds each particle, against the simulator's truth.

For sparse, medium and dense simulated slurries (FrameConfig.density 0, 0.5, 1) on a
PG ramp from 0 to 30 %, with particle separation `none`, `watershed`, `learned` (the
shipped detector, monitor/models/particle-detector) and `auto` (the default: the
watershed on frames whose foreground covers at most 15 %, the detector on the rest):

1. Precision and recall of particles at IoU >= 0.5, per class. Boxes are matched
   greedily, highest IoU first, one to one, against the in-focus particles of the
   ground truth; a found box that matches an out-of-focus particle instead is neither
   right nor wrong (the segmenter may keep it; `min_focus` is what drops those). A
   found box counts towards a class's precision as the class of the particle it
   matched or, unmatched, of the in-focus particle it overlaps most (unmatched boxes
   overlapping none count in the overall precision only).
2. The PG-fraction error: the 5-minute PG fraction (PG among the matched particles,
   by their ground-truth labels: the segmentation's own bias, no classifier error;
   with --classify, PG among all found crops as the shipped model calls them through
   ONNX Runtime) against the truth's own fraction of in-focus particles in the same
   window, as a mean absolute error in percentage points over the windows.
3. Segmentation time per 1360 x 1024 frame on one core: the CPU time of the whole of
   ParticleSampler.sample (background, threshold, split or detector, crops and masks)
   with OpenCV and ONNX Runtime on one thread, measured as the thread's CPU time so
   that other work on the machine does not inflate it.
4. The D50 error per class: the median equivalent circle diameter of the matched
   particles' masks (measure_mask) against the median of all in-focus particles of the
   class in the ground truth (its ecd_px).

    python -m bench.instances [--minutes 60] [--interval 10] [--classify] [--write]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from bench.report import machine_line, replace_section
from monitor.config.settings import ParticlesConfig
from monitor.imaging.particle_size import measure_mask
from monitor.simulator import CEX, PG, FrameConfig, FrameSimulator, ParticleTruth, RampProfile

Box = tuple[int, int, int, int]
DENSITIES = {"sparse": 0.0, "medium": 0.5, "dense": 1.0}
SEPARATIONS = ("none", "watershed", "learned", "auto")
WINDOW_S = 300.0
TARGETS = (
    "Issue 15's targets: recall >= 0.9 sparse and >= 0.75 dense; the 5-minute PG fraction "
    "within 3 points (MAE) on the ramp even dense; segmentation about 10 ms per frame on "
    "one core."
)
IOU_MATCH = 0.5


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    truth: Sequence[Box], found: Sequence[Box], threshold: float = IOU_MATCH
) -> list[tuple[int, int]]:
    """(truth index, found index) pairs, greedily by IoU (highest first), one to one,
    each pair at IoU >= threshold."""
    pairs = sorted(
        (
            (iou, t, f)
            for t, tb in enumerate(truth)
            for f, fb in enumerate(found)
            if (iou := box_iou(tb, fb)) >= threshold
        ),
        reverse=True,
    )
    used_t: set[int] = set()
    used_f: set[int] = set()
    matched = []
    for _, t, f in pairs:
        if t not in used_t and f not in used_f:
            used_t.add(t)
            used_f.add(f)
            matched.append((t, f))
    return matched


@dataclass
class InstanceTally:
    """Counts over frames: per class particles, found, right."""

    truth: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    right: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    found: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    found_total: int = 0

    def add(self, truths: Sequence[ParticleTruth], boxes: Sequence[Box]) -> list[tuple[int, str]]:
        """Score one frame; return (found index, ground-truth label) of each match."""
        counted = [t for t in truths if t.in_focus]
        others = [t for t in truths if not t.in_focus]
        matched = match_boxes([t.bbox for t in counted], boxes)
        for truth in counted:
            self.truth[truth.label] += 1
        labels = []
        for t, f in matched:
            self.right[counted[t].label] += 1
            self.found[counted[t].label] += 1
            labels.append((f, counted[t].label))
        taken = {f for _, f in matched}
        rest = [f for f in range(len(boxes)) if f not in taken]
        ignored = {
            rest[f] for _, f in match_boxes([t.bbox for t in others], [boxes[f] for f in rest])
        }
        for f in rest:
            if f in ignored:
                continue
            overlaps = [(box_iou(t.bbox, boxes[f]), t.label) for t in counted]
            best = max(overlaps, default=(0.0, ""))
            if best[0] > 0.0:
                self.found[best[1]] += 1
        self.found_total += len(boxes) - len(ignored)
        return labels

    def recall(self, label: str | None = None) -> float:
        labels = [label] if label else [CEX, PG]
        total = sum(self.truth[x] for x in labels)
        return sum(self.right[x] for x in labels) / total if total else float("nan")

    def precision(self, label: str | None = None) -> float:
        if label is None:
            right = self.right[CEX] + self.right[PG]
            return right / self.found_total if self.found_total else float("nan")
        return self.right[label] / self.found[label] if self.found[label] else float("nan")


@dataclass
class DensityResult:
    tally: InstanceTally
    windows: list[tuple[float, float]]  # (truth PG fraction, estimated) per window
    ms: list[float]
    crops_per_frame: float
    ecd: dict[str, tuple[list[float], list[float]]]  # per class: truth, measured (px)

    def d50_error(self, label: str) -> float:
        """Median ECD of the matched particles' masks against that of all in-focus
        particles of the class in the truth, as a relative error."""
        truth, measured = self.ecd[label]
        if not truth or not measured:
            return float("nan")
        return float(np.median(measured) / np.median(truth) - 1.0)

    @property
    def fraction_mae_points(self) -> float:
        errors = [abs(true - found) for true, found in self.windows]
        return 100.0 * float(np.mean(errors)) if errors else float("nan")


class ShippedClassifier:
    """The shipped default model through ONNX Runtime, one thread: PG or not per crop."""

    def __init__(self) -> None:
        from monitor.imaging.preprocess import prepare_batch
        from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
        from monitor.manifest import load_manifest

        model = load_manifest()
        self._spec = model.manifest.input
        self._pg = model.manifest.classes.index(PG)
        self._backend = OnnxRuntimeBackend(model, threads=1)
        self._prepare = prepare_batch

    def pg_count(self, crops: Sequence[np.ndarray]) -> int:
        if not crops:
            return 0
        scores = self._backend.infer(self._prepare(list(crops), self._spec))
        return int(np.count_nonzero(scores.argmax(axis=1) == self._pg))


def run_density(
    density: float, minutes: float, interval: float, classifier: ShippedClassifier | None
) -> dict[str, DensityResult]:
    """Render the ramp once at this density; score every separation on each frame."""
    ramp_s = minutes * 60.0
    config = FrameConfig(density=density, profile=RampProfile(0.0, 0.3, 0.0, ramp_s))
    simulator = FrameSimulator(config, seed=15)
    samplers = {sep: _sampler(sep) for sep in SEPARATIONS}
    tallies = {sep: InstanceTally() for sep in SEPARATIONS}
    times: dict[str, list[float]] = {sep: [] for sep in SEPARATIONS}
    crops: dict[str, int] = dict.fromkeys(SEPARATIONS, 0)
    ecd = {sep: {label: ([], []) for label in (CEX, PG)} for sep in SEPARATIONS}
    # Per window: truth (PG, all) and per separation the estimate's (PG, all).
    truth_counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    found_counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    frames = int(ramp_s // interval)
    for index in range(frames):
        t = index * interval
        window = int(t // WINDOW_S)
        image, truths = simulator.render(t)
        for truth in truths:
            if truth.in_focus:
                truth_counts[window][0] += truth.label == PG
                truth_counts[window][1] += 1
                for sep in SEPARATIONS:
                    ecd[sep][truth.label][0].append(truth.ecd_px)
        for sep, sampler in samplers.items():
            started = time.thread_time()
            sampled = sampler.sample(image)
            times[sep].append(1000.0 * (time.thread_time() - started))
            crops[sep] += len(sampled)
            matched = tallies[sep].add(truths, [crop.bbox for crop in sampled])
            for found, label in matched:
                mask = sampled[found].mask
                size = None if mask is None else measure_mask(mask)
                if size is not None:
                    ecd[sep][label][1].append(size.ecd)
            counts = found_counts[(sep, window)]
            if classifier is None:
                counts[0] += sum(label == PG for _, label in matched)
                counts[1] += len(matched)
            else:
                counts[0] += classifier.pg_count([crop.image for crop in sampled])
                counts[1] += len(sampled)
    results = {}
    for sep in SEPARATIONS:
        windows = []
        for window, (pg, total) in sorted(truth_counts.items()):
            found_pg, found_total = found_counts[(sep, window)]
            if total and found_total:
                windows.append((pg / total, found_pg / found_total))
        results[sep] = DensityResult(
            tallies[sep], windows, times[sep], crops[sep] / frames, ecd[sep]
        )
    return results


def _sampler(separation: str):  # type: ignore[no-untyped-def]
    from monitor.pipeline.sampling import ParticleSampler

    return ParticleSampler(ParticlesConfig(separation=separation))  # type: ignore[arg-type]


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"  # NaN: no such particle


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:+.1f} %"


def render_table(results: dict[str, dict[str, DensityResult]], classify: bool) -> str:
    source = "shipped model (ONNX Runtime)" if classify else "ground-truth labels of matched"
    lines = [
        "| slurry | separation | particles/frame (in focus) | found/frame | recall CEX | "
        "recall PG | recall | precision CEX | precision PG | precision | "
        f"5-min PG fraction MAE, points ({source}) | D50 error CEX | D50 error PG | "
        "segmentation ms/frame, median (p90) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_sep in results.items():
        for sep, result in by_sep.items():
            tally = result.tally
            in_focus = (tally.truth[CEX] + tally.truth[PG]) / max(1, len(result.ms))
            lines.append(
                f"| {name} | {sep} | {in_focus:.0f} | {result.crops_per_frame:.0f} | "
                f"{_f(tally.recall(CEX))} | {_f(tally.recall(PG))} | {_f(tally.recall())} | "
                f"{_f(tally.precision(CEX))} | {_f(tally.precision(PG))} | "
                f"{_f(tally.precision())} | {result.fraction_mae_points:.1f} | "
                f"{_pct(result.d50_error(CEX))} | {_pct(result.d50_error(PG))} | "
                f"{np.median(result.ms):.1f} ({np.percentile(result.ms, 90):.1f}) |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="ramp length (60)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between frames (10)")
    parser.add_argument(
        "--density",
        action="append",
        choices=tuple(DENSITIES),
        help="only these slurries (repeatable; default all three)",
    )
    parser.add_argument(
        "--classify",
        action="store_true",
        help="PG fraction from the shipped model on every found crop, not from the truth",
    )
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # segmentation time on one core
    classifier = ShippedClassifier() if args.classify else None
    names = args.density or list(DENSITIES)
    results = {}
    began = time.monotonic()
    for name in names:
        results[name] = run_density(DENSITIES[name], args.minutes, args.interval, classifier)
        print(f"{name}: done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    table = render_table(results, args.classify)
    print(table)
    if args.write:
        command = "python -m bench.instances " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        frames = int(args.minutes * 60 // args.interval)
        body = (
            f"{machine_line()}; OpenCV on one thread, segmentation as the thread's CPU "
            f"time. Command: `{command.strip()}`.\n\n"
            f"{frames} frames of 1360 x 1024 px per slurry (FrameConfig.density 0 / 0.5 / 1), "
            f"a PG ramp 0 -> 30 % over {args.minutes:g} min, one frame every "
            f"{args.interval:g} s, seed 15. Particles are matched at IoU >= 0.5 to the "
            "in-focus particles of the ground truth (see the docstring of "
            "bench/instances.py for the rules).\n\n" + table + "\n\n" + TARGETS
        )
        title = "instances: particle separation against ground truth"
        replace_section(
            Path("BENCHMARKS.md"), title + (", shipped model" if args.classify else ""), body
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
