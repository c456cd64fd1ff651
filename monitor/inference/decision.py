"""From a model's output rows to a label an operator can trust, or "I don't know"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from monitor.manifest import ModelManifest

Status = Literal["ok", "uncertain"]
Reason = Literal["low_confidence", "out_of_distribution"]


@dataclass(frozen=True)
class Decision:
    """The top class of one prediction, or why it cannot be trusted.

    `status` is "uncertain" with `reason` "out_of_distribution" when the crop lies far
    from anything the model was trained on (a photo, text, a bubble, a fouled window:
    the softmax is confident on those too, so confidence alone cannot catch them), and
    with "low_confidence" when the top probability is below the threshold. An uncertain
    result still carries its top class for display, but never counts as that class in
    any fraction.
    """

    label: str
    confidence: float
    status: Status
    reason: Reason | None = None
    ood_score: float | None = None


@dataclass(frozen=True)
class DecisionRule:
    """The manifest's thresholds, applied to the backend's output rows."""

    classes: tuple[str, ...]
    uncertainty_threshold: float
    ood_threshold: float | None = None

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> DecisionRule:
        return cls(
            classes=manifest.classes,
            uncertainty_threshold=manifest.uncertainty_threshold,
            ood_threshold=None if manifest.ood is None else manifest.ood.threshold,
        )

    @property
    def columns(self) -> int:
        """Output columns the model gives: one per class, plus the score when it has one."""
        return len(self.classes) + (self.ood_threshold is not None)

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """The class-probability columns of output rows (a view)."""
        return rows[:, : len(self.classes)]

    def decide(self, rows: np.ndarray) -> list[Decision]:
        """(N, columns) output rows -> one Decision per row."""
        if rows.ndim != 2 or rows.shape[1] != self.columns:
            with_score = " and the OOD score" if self.ood_threshold is not None else ""
            raise ValueError(
                f"model output has shape {rows.shape}, expected (N, {self.columns}) for "
                f"{len(self.classes)} classes{with_score}: the ONNX file and its manifest do not "
                "match; re-export the model"
            )
        probabilities = self.probabilities(rows)
        top = probabilities.argmax(axis=1)
        confidence = probabilities[np.arange(len(top)), top]
        scores: list[float | None]
        if self.ood_threshold is None:
            scores = [None] * len(top)
        else:
            scores = [float(score) for score in rows[:, -1]]
        limit = self.ood_threshold
        decisions = []
        for index, value, score in zip(top.tolist(), confidence.tolist(), scores, strict=True):
            reason: Reason | None = None
            # NaN compares false everywhere: a score that is not a number is no proof of
            # a crystal, so it rejects too.
            if score is not None and limit is not None and not score <= limit:
                reason = "out_of_distribution"
            elif value < self.uncertainty_threshold:
                reason = "low_confidence"
            decisions.append(
                Decision(
                    label=self.classes[index],
                    confidence=float(value),
                    status="ok" if reason is None else "uncertain",
                    reason=reason,
                    ood_score=score,
                )
            )
        return decisions
