"""How a candidate model compares with the live one on the same crops. Pure: rows in,
figures out; no store, no clock.

Per window: the share of crops on which both models reach the same call (the same class,
or both "I don't know"), and for each class its fraction under each model (among the
crops that model was sure of, as the published fractions count them) with the
difference and a 95 % interval for it. The crops of one frame are not independent (one
frame holds one slurry's moment), so the interval treats frames as clusters: the delta
method on the two ratio estimators, paired frame by frame (both models saw the same
crops, which makes the difference far tighter than two separate intervals would).

On labelled review crops: each model's accuracy, and McNemar's exact test on the crops
where exactly one of them was right.

The promotion rule (docs/model-promotion.md) reads these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

from monitor.aggregate.statistics import Z_95


@dataclass(frozen=True)
class FrameComparison:
    """One frame's crops under both models: certain calls per class, and agreement."""

    probe: str
    ts: float
    crops: int
    agreed: int
    live_counts: tuple[int, ...]
    candidate_counts: tuple[int, ...]


@dataclass(frozen=True)
class ClassDifference:
    name: str
    live: float | None
    candidate: float | None
    difference: float | None
    """candidate - live; None when either model was sure of no crop."""
    low: float | None
    high: float | None

    @property
    def significant(self) -> bool:
        """The interval excludes zero: the models disagree on this class's share."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class WindowComparison:
    probe: str
    start: float
    end: float
    frames: int
    crops: int
    agreed: int
    classes: tuple[ClassDifference, ...]

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.crops if self.crops else None


def compare_window(
    probe: str,
    *,
    start: float,
    end: float,
    frames: Sequence[FrameComparison],
    classes: Sequence[str],
    z: float = Z_95,
) -> WindowComparison:
    """The window's figures from its frames (all of one probe)."""
    live_total = sum(sum(f.live_counts) for f in frames)
    candidate_total = sum(sum(f.candidate_counts) for f in frames)
    differences = []
    for index, name in enumerate(classes):
        live_n = sum(f.live_counts[index] for f in frames)
        cand_n = sum(f.candidate_counts[index] for f in frames)
        live = live_n / live_total if live_total else None
        cand = cand_n / candidate_total if candidate_total else None
        if live is None or cand is None:
            differences.append(ClassDifference(name, live, cand, None, None, None))
            continue
        difference = cand - live
        # Each frame's contribution to the linearised difference of the two ratios.
        scores = [
            (f.candidate_counts[index] - cand * sum(f.candidate_counts)) / candidate_total
            - (f.live_counts[index] - live * sum(f.live_counts)) / live_total
            for f in frames
        ]
        n = len(scores)
        if n < 2:
            differences.append(ClassDifference(name, live, cand, difference, None, None))
            continue
        variance = n / (n - 1) * sum(s * s for s in scores)
        half = z * math.sqrt(variance)
        differences.append(
            ClassDifference(name, live, cand, difference, difference - half, difference + half)
        )
    return WindowComparison(
        probe=probe,
        start=start,
        end=end,
        frames=len(frames),
        crops=sum(f.crops for f in frames),
        agreed=sum(f.agreed for f in frames),
        classes=tuple(differences),
    )


def windows_of(
    frames: Sequence[FrameComparison], classes: Sequence[str], window_s: float
) -> list[WindowComparison]:
    """Frames grouped into aligned windows per probe, in time order."""
    groups: dict[tuple[str, float], list[FrameComparison]] = {}
    for frame in frames:
        start = math.floor(frame.ts / window_s) * window_s
        groups.setdefault((frame.probe, start), []).append(frame)
    return [
        compare_window(probe, start=start, end=start + window_s, frames=group, classes=classes)
        for (probe, start), group in sorted(
            groups.items(), key=lambda item: (item[0][1], item[0][0])
        )
    ]


@dataclass(frozen=True)
class LabelledScore:
    """Both models on the same labelled crops (labelled as a class, not "not a particle").
    A model is right on a crop when it was sure and called the label."""

    crops: int
    live_right: int
    candidate_right: int
    only_live_right: int
    only_candidate_right: int

    @property
    def live_accuracy(self) -> float | None:
        return self.live_right / self.crops if self.crops else None

    @property
    def candidate_accuracy(self) -> float | None:
        return self.candidate_right / self.crops if self.crops else None

    @property
    def p_value(self) -> float:
        """McNemar's exact two-sided test on the discordant crops."""
        return mcnemar_exact(self.only_live_right, self.only_candidate_right)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Integer over integer, rounded once: float(2**n) would overflow from n = 1024.
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)
    return min(1.0, 2 * tail)


def score_labelled(pairs: Sequence[tuple[str, bool, bool]]) -> LabelledScore:
    """`pairs`: (label, live right, candidate right) per labelled crop."""
    live = sum(1 for _, a, _ in pairs if a)
    cand = sum(1 for _, _, b in pairs if b)
    only_live = sum(1 for _, a, b in pairs if a and not b)
    only_cand = sum(1 for _, a, b in pairs if b and not a)
    return LabelledScore(len(pairs), live, cand, only_live, only_cand)


@dataclass(frozen=True)
class PromotionRule:
    """When a shadow may replace the live model (docs/model-promotion.md)."""

    min_window_crops: int = 200
    """A window counts as full evidence from this many compared crops (and two frames)."""
    min_full_windows: int = 3
    min_labelled: int = 50
    """Labelled crops both models were scored on, at least."""
    alpha: float = 0.05


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: tuple[str, ...]
    full_windows: int
    differing_windows: int
    checks: dict[str, bool] = field(default_factory=dict)


def differing_windows(windows: Sequence[WindowComparison], alpha: float) -> list[WindowComparison]:
    """The windows where a class fraction differs, judged over all of them at once.

    Each window's own 95 % interval misses a true zero one time in twenty, so over a
    12-hour batch of 5-minute windows two equally good models would "differ" in several
    windows by chance alone, and the rule could never let a candidate through on
    agreeing fractions. The verdict therefore tests every (window, class) difference at
    the family-wise level `alpha` (Bonferroni: each at alpha / tests), from the standard
    error its 95 % interval was built with. The per-window `significant` flag (shown in
    the report's table) stays the plain 95 % one.
    """
    tests = [
        (window, c)
        for window in windows
        for c in window.classes
        if c.difference is not None and c.low is not None and c.high is not None
    ]
    if not tests:
        return []
    z_family = NormalDist().inv_cdf(1 - alpha / (2 * len(tests)))
    differing: list[WindowComparison] = []
    for window, c in tests:
        assert c.difference is not None and c.low is not None and c.high is not None
        standard_error = (c.high - c.low) / (2 * Z_95)
        beyond = abs(c.difference) > z_family * standard_error
        if beyond and (not differing or differing[-1] is not window):
            differing.append(window)
    return differing


def promotion_verdict(
    windows: Sequence[WindowComparison], labelled: LabelledScore, rule: PromotionRule
) -> Verdict:
    """Promote when there is enough evidence and either
    - no full window shows a class fraction that differs beyond its interval, and the
      candidate is not worse on the labelled crops; or
    - the fractions do differ (what a model trained for this site is for), and the
      labelled crops show the candidate right significantly more often (McNemar).
    """
    # A window of one frame has no interval (frames are the clusters), so it can show
    # no difference either way: it is no evidence that the fractions agree.
    full = [w for w in windows if w.crops >= rule.min_window_crops and w.frames >= 2]
    differing = differing_windows(full, rule.alpha)
    reasons: list[str] = []
    enough_windows = len(full) >= rule.min_full_windows
    if not enough_windows:
        reasons.append(
            f"{len(full)} full windows (>= {rule.min_window_crops} compared crops from 2 or "
            f"more frames), {rule.min_full_windows} needed: let the shadow run longer or raise "
            "model.shadow.share"
        )
    enough_labels = labelled.crops >= rule.min_labelled
    if not enough_labels:
        reasons.append(
            f"{labelled.crops} labelled crops scored by both models, {rule.min_labelled} "
            "needed: label more crops on /label"
        )
    not_worse = labelled.candidate_right >= labelled.live_right
    better = (
        labelled.only_candidate_right > labelled.only_live_right and labelled.p_value < rule.alpha
    )
    if enough_labels and not not_worse:
        reasons.append(
            f"the candidate is right on {labelled.candidate_right} of {labelled.crops} labelled "
            f"crops, the live model on {labelled.live_right}: keep the live model; retrain the "
            "candidate with these labels (`crystal-monitor samples export`) and shadow it again"
        )
    if differing and enough_labels and not_worse and not better:
        reasons.append(
            f"{len(differing)} full windows show a class fraction differing beyond its "
            f"interval, and the labelled crops do not show the candidate better "
            f"(McNemar p = {labelled.p_value:.3g}, {rule.alpha} needed): label more crops "
            "where the two disagree"
        )
    promote = enough_windows and enough_labels and not_worse and (not differing or better)
    if promote:
        reasons.append(
            "fractions agree within their intervals and the candidate is not worse on "
            "labelled crops"
            if not differing
            else f"fractions differ in {len(differing)} full windows and the labelled crops "
            f"show the candidate right more often (McNemar p = {labelled.p_value:.3g})"
        )
    return Verdict(
        promote,
        tuple(reasons),
        len(full),
        len(differing),
        {
            "enough_windows": enough_windows,
            "enough_labels": enough_labels,
            "not_worse_on_labels": not_worse,
            "better_on_labels": better,
            "fractions_agree": not differing,
        },
    )
