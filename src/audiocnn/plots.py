"""Figures for people: training curves and the confusion matrix, as PNG.

Drawn on a bare Agg canvas (no pyplot state, no display needed) at fixed sizes and
dpi, without version metadata, and written atomically, so the same numbers give the
same bytes and DVC sees no spurious change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from audiocnn.fileio import atomic_path

log = logging.getLogger(__name__)

DPI = 100
_METADATA = {"Software": None}  # no matplotlib version in the file: identical bytes across upgrades
TRAIN_COLOR, VAL_COLOR, BEST_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"
LINESTYLES = ("-", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))  # an ensemble's networks, in turn


def _save(fig: Figure, out_png: str | Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=_METADATA)
    log.info("wrote %s", out_png)


def best_epoch(history: pd.DataFrame) -> int | None:
    """The epoch with the lowest val_loss (what early stopping restores), None if unknown."""
    if "val_loss" not in history or history["val_loss"].isna().all():
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"])


def plot_history(history: pd.DataFrame, out_png: str | Path) -> None:
    """Loss, accuracy (train vs val) and learning rate per epoch; the best epoch marked.

    ``history`` has columns epoch, loss, accuracy, val_loss, val_accuracy, lr (numbers or
    the strings of ``fileio.read_csv``); missing columns are left out of the figure. With a
    ``member`` column (an ensemble's networks), one set of curves and one best epoch per network.
    """
    frame = history.apply(pd.to_numeric, errors="coerce")
    groups = [(k, rows) for k, rows in frame.groupby("member")] if "member" in frame else [(None, frame)]
    fig = Figure(figsize=(13.0, 3.8))
    axes = fig.subplots(1, 3)
    for i, (member, rows) in enumerate(groups):
        rows = rows.sort_values("epoch").reset_index(drop=True)
        best = best_epoch(rows)
        name = "" if member is None else f" (network {int(member)})"
        style = {"marker": "." if member is None else None, "linestyle": LINESTYLES[i % len(LINESTYLES)]}
        for ax, metric in ((axes[0], "loss"), (axes[1], "accuracy")):
            for column, color, label in ((metric, TRAIN_COLOR, "train"), (f"val_{metric}", VAL_COLOR, "val")):
                if column in rows:
                    ax.plot(rows["epoch"], rows[column], color=color, label=label + name, **style)
            if best is not None:
                row = rows.loc[rows["epoch"] == best].iloc[0]
                ax.axvline(best, color=BEST_COLOR, linestyle="--", linewidth=1, label=f"best epoch {best}{name}")
                if f"val_{metric}" in rows:
                    ax.annotate(f"{row[f'val_{metric}']:.3f}", (best, row[f"val_{metric}"]), xytext=(4, 6),
                                textcoords="offset points", color=BEST_COLOR, fontsize=8)
        if "lr" in rows and rows["lr"].notna().any():
            axes[2].plot(rows["epoch"], rows["lr"], color="#7f7f7f", **style)
            if best is not None:
                axes[2].axvline(best, color=BEST_COLOR, linestyle="--", linewidth=1)
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.set(title=title, xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8 if len(groups) == 1 else 6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set(title="Learning rate", xlabel="epoch", ylabel="lr")
    axes[2].grid(alpha=0.3)
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    _save(fig, out_png)


def row_normalize(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall of that true class); empty rows stay 0."""
    counts = np.asarray(matrix, dtype=np.float64)  # (classes, classes) true x predicted
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], out_png: str | Path) -> None:
    """Two panels, counts and row-normalized, each cell annotated (rows: true, cols: predicted)."""
    counts = np.asarray(matrix)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {n} labels")
    norm = row_normalize(counts)
    side = min(max(4.0, 0.45 * n + 2.0), 20.0)  # inches per panel; fixed for a given class count
    fig = Figure(figsize=(2 * side + 1.0, side))
    axes = fig.subplots(1, 2)
    font = max(4.0, min(10.0, 60.0 / max(n, 1)))
    panels = ((axes[0], counts, "Counts", lambda v: f"{int(v)}"), (axes[1], norm, "Row-normalized (recall)",
                                                                   lambda v: f"{v:.2f}"))
    for ax, values, title, fmt in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1.0 if values is norm else max(1, counts.max()))
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if values is counts:
            bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel="predicted", ylabel="actual", xticks=range(n), yticks=range(n))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=font)
        ax.set_yticklabels(labels, fontsize=font)
        if n <= 40:
            threshold = (1.0 if values is norm else max(1, counts.max())) / 2
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, fmt(values[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if values[i, j] > threshold else "black")
    fig.tight_layout()
    _save(fig, out_png)
