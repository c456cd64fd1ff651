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
from matplotlib.ticker import MaxNLocator

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
    rates = [row["lr"] for row in rows]
    lr_axes.plot(epochs, rates, marker="o")
    lr_axes.set(title="learning rate (end of epoch)", xlabel="epoch")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    # From zero, so a short run's nearly flat schedule does not fill the panel with noise.
    loss_axes.set_ylim(bottom=0)
    lr_axes.set_ylim(0, max(rates, default=1.0) * 1.1 or 1.0)
    for axes in (loss_axes, score_axes, lr_axes):
        # Whole epochs only, with room either side: one epoch is one point, not a
        # fractional axis from 0.96 to 1.04.
        if len(epochs) <= 12:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(0.5, max(epochs, default=1) + 0.5)
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
