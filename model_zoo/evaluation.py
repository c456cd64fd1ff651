"""Evaluate an exported model directory on any ImageFolder, through ONNX Runtime.

This is the path the daemon takes (manifest -> `prepare_batch` -> the ONNX
Runtime backend), so the numbers are those the plant will see, not torch's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_zoo.imagefolder import DatasetError, find_classes, list_labelled_files, load_images
from model_zoo.metrics import compute_metrics, expected_calibration_error
from model_zoo.plots import plot_confusion_matrices
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.decision import DecisionRule
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import EvaluationMetrics, ModelManifest, load_manifest

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"
# A data set this small (the handful of reference crops, say) is listed file by file.
PER_FILE_LIMIT = 20
CALIBRATION_BINS = 15


@dataclass(frozen=True)
class Misclassified:
    path: Path
    true: str
    predicted: str
    probability: float


@dataclass(frozen=True)
class FilePrediction:
    """One image: its folder's class, the model's top class and its probability."""

    path: Path
    true: str
    predicted: str
    confidence: float
    reason: str | None = None
    """Why the daemon would not count it: low_confidence, out_of_distribution, or None."""
    ood_score: float | None = None


@dataclass(frozen=True)
class EvaluationReport:
    """The exported model on one labelled folder.

    New measures (out-of-distribution counts, say) go in as fields with defaults
    and in `to_json`; the command line and evaluation.json read everything here.
    """

    classes: tuple[str, ...]
    metrics: EvaluationMetrics
    misclassified: list[Misclassified]
    uncertain: int
    unreadable: list[tuple[Path, str]]
    images: int
    data_dir: Path = Path()
    expected_calibration_error: float = 0.0
    predictions: list[FilePrediction] = field(default_factory=list)
    out_of_distribution: int = 0
    """Images the model's out-of-distribution check rejects (counted in `uncertain` too)."""

    @property
    def recall_per_class(self) -> dict[str, float]:
        return {name: values.recall for name, values in self.metrics.per_class.items()}

    @property
    def lists_files(self) -> bool:
        """Small enough to show one line per file."""
        return self.images <= PER_FILE_LIMIT

    def to_json(self) -> dict[str, object]:
        return {
            "data_dir": str(self.data_dir.resolve()),
            "images": self.images,
            "uncertain": self.uncertain,
            "out_of_distribution": self.out_of_distribution,
            "accuracy": self.metrics.accuracy,
            "macro_f1": self.metrics.macro_f1,
            "recall_per_class": self.recall_per_class,
            "expected_calibration_error": self.expected_calibration_error,
            "calibration_bins": CALIBRATION_BINS,
            "confusion_matrix": self.metrics.confusion_matrix,
            "metrics": self.metrics.model_dump(),
            "misclassified": [
                {
                    "file": str(item.path),
                    "true": item.true,
                    "predicted": item.predicted,
                    "probability": round(item.probability, 6),
                }
                for item in self.misclassified
            ],
            "predictions": [
                {
                    "file": str(item.path),
                    "true": item.true,
                    "predicted": item.predicted,
                    "confidence": round(item.confidence, 6),
                    "reason": item.reason,
                    "ood_score": None if item.ood_score is None else round(item.ood_score, 4),
                }
                for item in self.predictions
            ],
            "unreadable": [[str(path), reason] for path, reason in self.unreadable],
        }


def evaluate_model_dir(
    model_dir: Path,
    data_dir: Path,
    *,
    out_dir: Path | None = None,
    batch_size: int = 64,
    threads: int = 0,
) -> EvaluationReport:
    """Classify every image under `data_dir/<class>/` and compare with its folder."""
    (report,) = evaluate_model_dirs(
        model_dir, [data_dir], out_dir=out_dir, batch_size=batch_size, threads=threads
    )
    return report


def evaluate_model_dirs(
    model_dir: Path,
    data_dirs: Sequence[Path],
    *,
    out_dir: Path | None = None,
    batch_size: int = 64,
    threads: int = 0,
) -> list[EvaluationReport]:
    """One report per labelled folder, through one ONNX Runtime session.

    Every folder is checked before any is classified, so a wrong path fails at once.
    """
    loaded_model = load_manifest(model_dir)
    manifest = loaded_model.manifest
    for data_dir in data_dirs:
        _check_class_folders(data_dir, manifest.classes)
    backend = OnnxRuntimeBackend(loaded_model, threads=threads)
    try:
        reports = [
            _evaluate_folder(backend, manifest, data_dir, batch_size, threads)
            for data_dir in data_dirs
        ]
    finally:
        backend.close()
    if out_dir is not None:
        write_evaluations(reports, model_dir, out_dir)
    return reports


def _check_class_folders(data_dir: Path, classes: Sequence[str]) -> None:
    folder_classes = find_classes(data_dir)
    unknown = sorted(set(folder_classes) - set(classes))
    if unknown:
        hint = (
            " (this looks like a train/val/test layout: point at one split folder)"
            if {"train", "val"} & set(unknown)
            else ""
        )
        raise DatasetError(
            f"class folders {unknown} in {data_dir} are not classes of the model "
            f"{list(classes)}; evaluate on folders named after the model's classes{hint}"
        )


def _evaluate_folder(
    backend: OnnxRuntimeBackend,
    manifest: ModelManifest,
    data_dir: Path,
    batch_size: int,
    threads: int,
) -> EvaluationReport:
    classes = manifest.classes
    loaded = load_images(list_labelled_files(data_dir, classes), threads=max(1, threads or 2))
    if not loaded.files:
        raise DatasetError(f"no readable images under {data_dir}")
    outputs = np.concatenate(
        [
            backend.infer(prepare_batch(loaded.images[start : start + batch_size], manifest.input))
            for start in range(0, len(loaded.images), batch_size)
        ]
    )
    # A graph with an out-of-distribution check appends its score as a last column; the
    # metrics are those of the top class, the decisions say what the daemon would count.
    rule = DecisionRule.from_manifest(manifest)
    probabilities = rule.probabilities(outputs)
    decisions = rule.decide(outputs)
    predicted = probabilities.argmax(axis=1)
    metrics = compute_metrics(loaded.labels, predicted, classes)
    predictions = [
        FilePrediction(
            item.path,
            classes[item.label],
            decision.label,
            decision.confidence,
            decision.reason,
            decision.ood_score,
        )
        for item, decision in zip(loaded.files, decisions, strict=True)
    ]
    return EvaluationReport(
        classes=classes,
        metrics=metrics,
        misclassified=[
            Misclassified(item.path, item.true, item.predicted, item.confidence)
            for item in predictions
            if item.true != item.predicted
        ],
        uncertain=sum(decision.status == "uncertain" for decision in decisions),
        out_of_distribution=sum(d.reason == "out_of_distribution" for d in decisions),
        unreadable=loaded.unreadable,
        images=len(loaded.files),
        data_dir=data_dir,
        expected_calibration_error=expected_calibration_error(
            probabilities, loaded.labels, CALIBRATION_BINS
        ),
        predictions=predictions,
    )


def write_evaluations(reports: Sequence[EvaluationReport], model_dir: Path, out_dir: Path) -> None:
    """`evaluation.json` (one entry per data set) and `confusion_matrix.png` in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_dir": str(model_dir.resolve()),
        "classes": list(reports[0].classes),
        "data_sets": [report.to_json() for report in reports],
    }
    (out_dir / EVALUATION_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    panels: dict[str, EvaluationMetrics] = {}
    for index, report in enumerate(reports):
        title = report.data_dir.resolve().name or str(report.data_dir)
        panels[title if title not in panels else f"{title} ({index + 1})"] = report.metrics
    plot_confusion_matrices(panels, reports[0].classes, out_dir / CONFUSION_FILE)
