"""Figures: files written, deterministic bytes, the best epoch and the row normalization right."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audiocnn import plots


def history() -> pd.DataFrame:
    return pd.DataFrame({
        "epoch": [1, 2, 3, 4], "loss": [1.0, 0.8, 0.6, 0.5], "accuracy": [0.3, 0.5, 0.7, 0.8],
        "val_loss": [1.1, 0.7, 0.75, 0.8], "val_accuracy": [0.3, 0.6, 0.6, 0.65], "lr": [3e-3, 2e-3, 1e-3, 5e-4],
    })


def test_best_epoch_is_lowest_val_loss():
    assert plots.best_epoch(history()) == 2
    assert plots.best_epoch(history().drop(columns="val_loss")) is None


def test_plot_history_writes_same_png_twice(tmp_path):
    plots.plot_history(history(), tmp_path / "a" / "curves.png")
    as_text = history().astype(str)  # as fileio.read_csv gives it
    plots.plot_history(as_text, tmp_path / "b.png")
    first, second = (tmp_path / "a" / "curves.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert first == second and len(first) > 10_000
    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (1300, 380)
    assert not list(tmp_path.rglob("*.tmp"))


def test_row_normalize():
    norm = plots.row_normalize(np.array([[3, 1], [0, 0]]))
    assert np.allclose(norm, [[0.75, 0.25], [0.0, 0.0]])


def test_plot_confusion(tmp_path):
    plots.plot_confusion(np.array([[5, 1, 0], [0, 3, 2], [1, 0, 7]]), ["a", "b", "c"], tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (900, 400) and np.asarray(image.convert("L")).std() > 10
    with pytest.raises(ValueError, match="does not match 2 labels"):
        plots.plot_confusion(np.zeros((3, 3)), ["a", "b"], tmp_path / "bad.png")
