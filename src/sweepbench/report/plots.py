"""Charts: a run's learning curve and confusion matrix, and a comparison's accuracy-vs-time and speed-ups."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .compare import Comparison, metric_names, per_run_frame

def _figure(width: float = 6.4, height: float = 4.8) -> tuple[Any, Any]:
    """A figure drawn off-screen (Agg), so plots work on a headless machine and never open a window.
    Margins are set by hand: an automatic layout engine doubles the time to render a run's plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height))
    figure.subplots_adjust(left=0.12, right=0.88, bottom=0.12, top=0.92)
    return figure, axes


def plot_learning_curve(history: Sequence[Any]) -> Any:
    """Losses and validation accuracy per epoch from a run's ``EpochRecord`` history."""
    figure, loss_axes = _figure()
    epochs = [record.epoch for record in history]
    loss_axes.plot(epochs, [r.train_loss for r in history], marker="o", label="train loss")
    loss_axes.plot(epochs, [r.val_loss for r in history], marker="o", label="val loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("cross-entropy loss")
    accuracy_axes = loss_axes.twinx()
    accuracy_axes.plot(epochs, [r.val_accuracy for r in history], marker="s", color="tab:green",
                       label="val accuracy")
    accuracy_axes.set_ylabel("validation accuracy")
    handles = loss_axes.get_legend_handles_labels()[0] + accuracy_axes.get_legend_handles_labels()[0]
    loss_axes.legend(handles=handles, loc="center right")
    loss_axes.set_title("Learning curve")
    return figure


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Any:
    """Counts of (true class, predicted class) on the test set, shaded by row share: kept rather than
    scikit-learn's ``ConfusionMatrixDisplay``, which shades by the numbers it prints, so it shows shares or counts
    but not counts shaded by share."""
    import numpy as np

    counts = np.asarray(matrix)
    figure, axes = _figure(7, 6)
    figure.subplots_adjust(left=0.16, right=0.98, bottom=0.17)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (test set)")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def group_labels(frame: pd.DataFrame, group_by: Sequence[str]) -> pd.Series:
    return frame[list(group_by)].astype(str).agg(" / ".join, axis=1)


def plot_accuracy_vs_time(frame: pd.DataFrame, group_by: Sequence[str], accuracy_metric: str,
                          time_metric: str) -> Any:
    """Every run as a dot, each group's median as a labelled diamond: up and to the left is better."""
    figure, axes = _figure(8, 5.5)
    figure.subplots_adjust(right=0.62)
    labels = group_labels(frame, group_by)
    for label in sorted(labels.unique()):
        group = frame[labels == label]
        dots = axes.scatter(group[time_metric], group[accuracy_metric], alpha=0.45, s=20)
        axes.scatter(group[time_metric].median(), group[accuracy_metric].median(), marker="D", s=70,
                     color=dots.get_facecolor()[0], edgecolor="black", label=f"{label} (n={len(group)})")
    axes.set_xlabel(f"{time_metric} (lower is better)")
    axes.set_ylabel(f"{accuracy_metric} (higher is better)")
    axes.set_title(f"{accuracy_metric} vs {time_metric}: runs (dots), group medians (diamonds)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title=" / ".join(group_by),
                title_fontsize=8)
    return figure


def plot_speedups(table: pd.DataFrame, group_by: Sequence[str], metric: str) -> Any:
    """One bar per group: its speed-up in ``metric`` over the baseline, with the baseline at 1x."""
    labels = group_labels(table, group_by)
    speedups = table[f"{metric}_speedup"]
    height = 1.5 + 0.4 * len(table)
    figure, axes = _figure(8, height)
    figure.subplots_adjust(left=0.4, right=0.92, bottom=0.7 / height, top=1 - 0.5 / height)
    bars = axes.barh(range(len(table)), speedups.fillna(0),
                     color=["tab:green" if value >= 1 else "tab:red" for value in speedups.fillna(0)])
    axes.bar_label(bars, labels=["n/a" if math.isnan(value) else f"{value:.2f}x" for value in speedups],
                   padding=3, fontsize=8)
    axes.set_yticks(range(len(table)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.axvline(1, color="black", linewidth=1)
    axes.set_xlabel(f"speed-up in {metric} over the baseline (x)")
    axes.set_title(f"Speed-up ({metric})")
    return figure


def write_plots(runs: pd.DataFrame, comparison: Comparison, directory: str | Path,
                accuracy_metric: str = "test_accuracy", time_metric: str = "train_seconds") -> list[Path]:
    """Writes ``accuracy_vs_time.png`` (every run of ``runs``, placed in the comparison's groups) and, when
    the comparison has speed-ups in ``time_metric``, ``speedup.png``."""
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = comparison.group_by
    frame = per_run_frame(runs, keys, metric_names(runs, [accuracy_metric, time_metric]))
    figures = {"accuracy_vs_time.png": plot_accuracy_vs_time(frame, keys, accuracy_metric, time_metric)}
    if f"{time_metric}_speedup" in comparison.table.columns:
        figures["speedup.png"] = plot_speedups(comparison.table, keys, time_metric)
    written = []
    for name, figure in figures.items():
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)
        written.append(directory / name)
    return written
