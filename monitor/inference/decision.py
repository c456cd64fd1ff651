"""From class probabilities to a label an operator can trust."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Status = Literal["ok", "uncertain"]


@dataclass(frozen=True)
class Decision:
    """The top class of one prediction; `uncertain` when below the manifest's threshold.

    An uncertain result still carries its top class for display, but never counts
    as that class in any fraction.
    """

    label: str
    confidence: float
    status: Status


def decide(probabilities: np.ndarray, classes: tuple[str, ...], threshold: float) -> list[Decision]:
    """(N, C) probabilities -> one Decision per row."""
    top = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(top)), top]
    return [
        Decision(
            label=classes[int(index)],
            confidence=float(value),
            status="ok" if value >= threshold else "uncertain",
        )
        for index, value in zip(top, confidence, strict=True)
    ]
