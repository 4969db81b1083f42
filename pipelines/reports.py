"""Parity plots: per-example error distributions and the reference's confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines
    import matplotlib.pyplot as plt

    return plt


def error_distribution_png(path: Path, errors: dict[str, np.ndarray], bounds: dict[str, float | None],
                           reference: str) -> None:
    """One histogram per candidate of the per-example max |Δ score| against ``reference``."""
    plt = pyplot()
    names = list(errors)
    columns = 2
    rows = (len(names) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(11, 2.6 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        # log scale: exact zeros shown at 1e-12; in float64, so 60 bins over a narrow range stay distinct (float32
        # errors near 1e-7 whose logs differ by 1e-6 have no 60 float32 edges between them)
        values = np.log10(np.maximum(np.asarray(errors[name], np.float64), 1e-12))
        finite = values[np.isfinite(values)]  # a variant whose scores overflowed (inf, NaN) is counted, not drawn
        # errors all within a hair of each other (an untrained model's equal scores) get one bar
        if finite.size:
            # one filled outline, not 60 bar patches: half the figure's drawing time
            axis.hist(finite, bins=60 if np.ptp(finite) > 1e-6 else 1, color="#3b6ea8", histtype="stepfilled")
        if finite.size < values.size:
            axis.text(0.98, 0.92, f"{values.size - finite.size} of {values.size} not finite", ha="right",
                      va="top", transform=axis.transAxes, color="#c0392b", fontsize=9)
        bound = bounds.get(name)
        if bound is not None:
            axis.axvline(np.log10(bound), color="#c0392b", linestyle="--", label=f"tolerance {bound:g}")
            axis.legend(loc="upper left", fontsize=8)
        axis.set_title(f"{reference} -> {name}", fontsize=10)
        axis.set_xlabel("log10 max |Δ score| per example", fontsize=8)
        axis.set_ylabel("examples", fontsize=8)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def confusion_matrix_png(path: Path, labels: tuple[str, ...], truth: np.ndarray, predicted: np.ndarray,
                         title: str) -> None:
    plt = pyplot()
    count = len(labels)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.16 * count + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(count)
    axis.set_xticks(ticks, labels, fontsize=max(4, 10 - count // 10))
    axis.set_yticks(ticks, labels, fontsize=max(4, 10 - count // 10))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    accuracy = float(np.trace(matrix)) / max(int(matrix.sum()), 1)
    axis.set_title(f"{title}: accuracy {accuracy:.2%} on {int(matrix.sum())} test images", fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of true class")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def training_curves_png(path: Path, history: list[dict]) -> None:
    """Training loss and validation accuracy per epoch (the test split is evaluated once, after training)."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss (cross-entropy)")
    accuracy_axis.plot(epochs, [row["val_accuracy"] for row in history], marker="o", color="#2e8b57")
    best = max(history, key=lambda row: row["val_accuracy"], default=None)
    if best is not None:
        accuracy_axis.axvline(best["epoch"], color="#999999", linestyle="--", label=f"kept: epoch {best['epoch']}")
        accuracy_axis.legend(loc="lower right")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
