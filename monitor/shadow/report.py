"""The shadow report: the comparison record cut into windows for a time range, the
labelled crops scored, and the promotion verdict; one document for
`crystal-monitor shadow report` and `/api/shadow` alike."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from monitor.review.sample_store import SampleStore
from monitor.shadow.comparison import (
    LabelledScore,
    PromotionRule,
    WindowComparison,
    promotion_verdict,
    score_labelled,
    windows_of,
)
from monitor.shadow.store import ShadowStore


def labelled_score(
    shadow: ShadowStore, samples: SampleStore | None, candidate: str, classes: tuple[str, ...]
) -> LabelledScore:
    """Both models on the review crops labelled as a class that the candidate was scored
    on; the live model's call is the one recorded when the crop was kept."""
    if samples is None:
        return score_labelled([])
    calls = shadow.labelled(candidate)
    pairs = []
    after = 0
    while True:
        page = samples.labelled(after_id=after, limit=1000)
        if not page:
            break
        after = page[-1].id
        for sample in page:
            call = calls.get(sample.id)
            if call is None or sample.label not in classes:
                continue
            live_right = sample.status == "ok" and sample.guess == sample.label
            candidate_right = call.status == "ok" and call.guess == sample.label
            pairs.append((str(sample.label), live_right, candidate_right))
    return score_labelled(pairs)


def _window_json(window: WindowComparison) -> dict[str, Any]:
    return {
        "probe": window.probe,
        "start": window.start,
        "end": window.end,
        "frames": window.frames,
        "crops": window.crops,
        "agreement": window.agreement,
        "classes": {
            c.name: {
                "live": c.live,
                "candidate": c.candidate,
                "difference": c.difference,
                "difference_ci": [c.low, c.high],
                "significant": c.significant,
            }
            for c in window.classes
        },
    }


def shadow_report(
    shadow: ShadowStore,
    samples: SampleStore | None,
    *,
    window_s: float,
    since: float | None = None,
    until: float | None = None,
    candidate: str | None = None,
    rule: PromotionRule | None = None,
) -> dict[str, Any]:
    rule = rule or PromotionRule()
    candidates = shadow.candidates()
    candidate = candidate or (candidates[-1] if candidates else None)
    classes = shadow.classes()
    if candidate is None or classes is None:
        return {
            "candidate": None,
            "candidates": candidates,
            "windows": [],
            "note": "no frame compared yet",
        }
    rows = shadow.frames(since=since, until=until, candidate_model=candidate)
    windows = windows_of([frame for frame, _, _ in rows], classes, window_s)
    labelled = labelled_score(shadow, samples, candidate, classes)
    verdict = promotion_verdict(windows, labelled, rule)
    crops = sum(w.crops for w in windows)
    return {
        "candidate": candidate,
        "candidates": candidates,
        "live_models": sorted({live for _, live, _ in rows}),
        "classes": list(classes),
        "window_s": window_s,
        "since": since,
        "until": until,
        "frames": len(rows),
        "crops": crops,
        "agreement": sum(w.agreed for w in windows) / crops if crops else None,
        "windows": [_window_json(w) for w in windows],
        "labelled": {
            "crops": labelled.crops,
            "live_accuracy": labelled.live_accuracy,
            "candidate_accuracy": labelled.candidate_accuracy,
            "only_live_right": labelled.only_live_right,
            "only_candidate_right": labelled.only_candidate_right,
            "mcnemar_p": labelled.p_value,
        },
        "rule": asdict(rule),
        "verdict": {
            "promote": verdict.promote,
            "reasons": list(verdict.reasons),
            "full_windows": verdict.full_windows,
            "differing_windows": verdict.differing_windows,
            "checks": verdict.checks,
        },
    }
