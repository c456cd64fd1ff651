"""Evaluate an exported model directory on any ImageFolder, through ONNX Runtime.

This is the path the daemon takes (manifest -> `prepare_batch` -> the ONNX
Runtime backend), so the numbers are those the plant will see, not torch's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_zoo.imagefolder import DatasetError, find_classes, list_labelled_files, load_images
from model_zoo.metrics import compute_metrics
from model_zoo.plots import plot_confusion_matrices
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import EvaluationMetrics, load_manifest
from monitor.preprocess import prepare_batch

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"


@dataclass(frozen=True)
class Misclassified:
    path: Path
    true: str
    predicted: str
    probability: float


@dataclass(frozen=True)
class EvaluationReport:
    classes: tuple[str, ...]
    metrics: EvaluationMetrics
    misclassified: list[Misclassified]
    uncertain: int
    unreadable: list[tuple[Path, str]]
    images: int


def evaluate_model_dir(
    model_dir: Path,
    data_dir: Path,
    *,
    out_dir: Path | None = None,
    batch_size: int = 64,
    threads: int = 0,
) -> EvaluationReport:
    """Classify every image under `data_dir/<class>/` and compare with its folder."""
    loaded_model = load_manifest(model_dir)
    manifest = loaded_model.manifest
    classes = manifest.classes
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
    loaded = load_images(list_labelled_files(data_dir, classes), threads=max(1, threads or 2))
    if not loaded.files:
        raise DatasetError(f"no readable images under {data_dir}")

    backend = OnnxRuntimeBackend(loaded_model, threads=threads)
    try:
        probabilities = np.concatenate(
            [
                backend.infer(
                    prepare_batch(loaded.images[start : start + batch_size], manifest.input)
                )
                for start in range(0, len(loaded.images), batch_size)
            ]
        )
    finally:
        backend.close()
    predicted = probabilities.argmax(axis=1)
    top = probabilities.max(axis=1)
    metrics = compute_metrics(loaded.labels, predicted, classes)
    misclassified = [
        Misclassified(item.path, classes[item.label], classes[int(guess)], float(top[index]))
        for index, (item, guess) in enumerate(zip(loaded.files, predicted, strict=True))
        if guess != item.label
    ]
    report = EvaluationReport(
        classes=classes,
        metrics=metrics,
        misclassified=misclassified,
        uncertain=int((top < manifest.uncertainty_threshold).sum()),
        unreadable=loaded.unreadable,
        images=len(loaded.files),
    )
    if out_dir is not None:
        write_evaluation(report, model_dir, data_dir, out_dir)
    return report


def write_evaluation(
    report: EvaluationReport, model_dir: Path, data_dir: Path, out_dir: Path
) -> None:
    """`evaluation.json` and `confusion_matrix.png` in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_dir": str(model_dir.resolve()),
        "data_dir": str(data_dir.resolve()),
        "classes": list(report.classes),
        "images": report.images,
        "uncertain": report.uncertain,
        "metrics": report.metrics.model_dump(),
        "misclassified": [
            {
                "file": str(item.path),
                "true": item.true,
                "predicted": item.predicted,
                "probability": round(item.probability, 6),
            }
            for item in report.misclassified
        ],
        "unreadable": [[str(path), reason] for path, reason in report.unreadable],
    }
    (out_dir / EVALUATION_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    plot_confusion_matrices(
        {data_dir.name: report.metrics}, report.classes, out_dir / CONFUSION_FILE
    )
