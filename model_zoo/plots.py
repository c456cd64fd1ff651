"""PNG plots of training curves and confusion matrices.

Uses matplotlib's object API on the Agg canvas: no pyplot global state and no
display needed, so it works on a headless plant box and inside worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monitor.manifest import EvaluationMetrics


def plot_training_curves(rows: Sequence[Mapping[str, float]], path: Path) -> None:
    """Loss, validation accuracy/macro-F1 and learning rate per epoch."""
    epochs = [row["epoch"] for row in rows]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, score_axes, lr_axes = figure.subplots(1, 3)
    loss_axes.plot(epochs, [row["train_loss"] for row in rows], marker="o", label="train")
    loss_axes.plot(epochs, [row["val_loss"] for row in rows], marker="o", label="validation")
    loss_axes.set(title="cross-entropy loss", xlabel="epoch")
    loss_axes.legend()
    score_axes.plot(epochs, [row["val_accuracy"] for row in rows], marker="o", label="accuracy")
    score_axes.plot(epochs, [row["val_macro_f1"] for row in rows], marker="o", label="macro-F1")
    score_axes.set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    score_axes.legend()
    lr_axes.plot(epochs, [row["lr"] for row in rows], marker="o")
    lr_axes.set(title="learning rate (end of epoch)", xlabel="epoch")
    figure.savefig(path, dpi=110)


def plot_confusion_matrices(
    matrices: Mapping[str, EvaluationMetrics], classes: Sequence[str], path: Path
) -> None:
    """One panel per labelled set; colour is the row share, text the count."""
    figure = Figure(figsize=(4.2 * len(matrices) + 0.6, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = np.atleast_1d(figure.subplots(1, len(matrices)))
    for axes, (title, metrics) in zip(axes_list, matrices.items(), strict=True):
        counts = np.asarray(metrics.confusion_matrix, dtype=np.int64)
        row_totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
        axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for (row, column), count in np.ndenumerate(counts):
            axes.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                color="white" if shares[row, column] > 0.5 else "black",
            )
        ticks = range(len(classes))
        axes.set_xticks(ticks, classes, rotation=45, ha="right")
        axes.set_yticks(ticks, classes)
        axes.set(
            title=f"{title} (accuracy {metrics.accuracy:.3f})",
            xlabel="predicted",
            ylabel="true",
        )
    figure.savefig(path, dpi=110)
