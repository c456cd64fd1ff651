"""Classification metrics over class indices, with no torch dependency.

Returns `monitor.manifest.EvaluationMetrics`, the form the manifest stores, so the
numbers written at training time and those recomputed by `evaluate` are alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitor.manifest import ClassMetrics, EvaluationMetrics


def compute_confusion_matrix(
    true_labels: Sequence[int] | np.ndarray,
    predicted_labels: Sequence[int] | np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class."""
    true = np.asarray(true_labels, dtype=np.int64).ravel()
    predicted = np.asarray(predicted_labels, dtype=np.int64).ravel()
    if true.shape != predicted.shape:
        raise ValueError(
            f"{true.size} true labels but {predicted.size} predictions; pass one of each per image"
        )
    for name, labels in (("true", true), ("predicted", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def summarise_confusion_matrix(matrix: np.ndarray, classes: Sequence[str]) -> EvaluationMetrics:
    """Per-class precision/recall/F1, macro-F1 and accuracy from a confusion matrix.

    A ratio with a zero denominator (a class never predicted, or never present) is
    0, not an error, as scikit-learn's `zero_division=0`. Macro-F1 averages over the
    classes that occur in the truth or in the predictions: a class absent from both
    (evaluating a two-class folder with a three-class model) says nothing about the
    model and would otherwise pull the mean down with a meaningless 0.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix is {matrix.shape}, expected {len(classes)} square")
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_ratio(true_positives, predicted)
    recall = _safe_ratio(true_positives, support)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    occurring = (support > 0) | (predicted > 0)
    total = int(matrix.sum())
    return EvaluationMetrics(
        accuracy=float(true_positives.sum() / total) if total else 0.0,
        macro_f1=float(f1[occurring].mean()) if occurring.any() else 0.0,
        per_class={
            name: ClassMetrics(
                precision=float(precision[index]),
                recall=float(recall[index]),
                f1=float(f1[index]),
                support=int(support[index]),
            )
            for index, name in enumerate(classes)
        },
        confusion_matrix=matrix.tolist(),
    )


def compute_metrics(
    true_labels: Sequence[int] | np.ndarray,
    predicted_labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
) -> EvaluationMetrics:
    """Metrics for label indices into `classes` (the model's output order)."""
    matrix = compute_confusion_matrix(true_labels, predicted_labels, len(classes))
    return summarise_confusion_matrix(matrix, classes)


def format_metrics_table(metrics: EvaluationMetrics) -> str:
    """A plain-text table of per-class metrics, for the terminal."""
    width = max(8, *(len(name) for name in metrics.per_class))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, values in metrics.per_class.items():
        lines.append(
            f"{name:<{width}}  {values.precision:9.4f}  {values.recall:6.4f}  "
            f"{values.f1:6.4f}  {values.support:7d}"
        )
    total = sum(values.support for values in metrics.per_class.values())
    lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {metrics.accuracy:6.4f}  {total:7d}")
    lines.append(f"{'macro-F1':<{width}}  {'':9}  {'':6}  {metrics.macro_f1:6.4f}")
    return "\n".join(lines)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = np.asarray(denominator, dtype=np.float64)
    result = np.zeros_like(denominator)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def expected_calibration_error(
    probabilities: np.ndarray, true_labels: Sequence[int] | np.ndarray, bins: int = 15
) -> float:
    """Expected calibration error of the top probability (Guo et al. 2017).

    The top probabilities fall into `bins` equal-width bins over [0, 1], each bin
    (lo, hi] and the first also holding 0; the ECE is the image-weighted mean, over
    bins, of |accuracy - mean top probability|. 0 means the confidence the model
    states is the accuracy it has.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    true = np.asarray(true_labels, dtype=np.int64).ravel()
    if probabilities.ndim != 2 or probabilities.shape[0] != true.size:
        raise ValueError(
            f"need one row of class probabilities per label, got {probabilities.shape} "
            f"for {true.size} labels"
        )
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if true.size == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == true
    # ceil(c * bins) - 1 puts c in (k/bins, (k+1)/bins] into bin k; 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        members = index == k
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            total += members.sum() / true.size * gap
    return float(total)
