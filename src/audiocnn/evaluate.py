"""Stage evaluate: the trained model on the test split -> metrics, confusion, report, MLflow.

A clip's prediction is the mean of the model's probabilities over its inputs: for
``cnn`` the sliding windows (``train.window_seconds`` long, every
``evaluate.hop_seconds``) that cover the whole clip, for ``seed`` its one image. The
windows of many clips go through the model together, in chunks, so the model is not
called once per clip. The metric functions take probabilities and labels only, so they
are tested without TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from audiocnn import data, fileio, models, plots, tracking
from audiocnn.config import check
from audiocnn.errors import DataError

if TYPE_CHECKING:
    from audiocnn.spectrogram import SpectrogramParams

log = logging.getLogger(__name__)

EPSILON = 1e-7  # probability floor in the cross-entropy, as Keras clips
MLFLOW_PREFIX = "eval/"  # metrics/eval.json keys in MLflow as eval/<key>: the file name is the namespace


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate``: how test clips are cut and batched."""

    hop_seconds: float  # window hop over clips longer than train.window_seconds
    batch_size: int  # windows per model call

    def __post_init__(self) -> None:
        check(self.hop_seconds > 0, "hop_seconds", self.hop_seconds, "must be > 0 s")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


def hop_frames(hop_seconds: float, sample_rate: int, hop_length: int) -> int:
    """Feature frames between window starts (at least 1)."""
    return max(1, int(round(hop_seconds * sample_rate / hop_length)))


# --- pure: predictions and metrics ------------------------------------------------------------


def clip_probabilities(inputs: Iterable[np.ndarray], predict: Callable[[np.ndarray], np.ndarray],
                       chunk: int) -> np.ndarray:
    """Mean probabilities per clip: (n_clips, n_classes) float64.

    ``inputs`` yields one array per clip, (n_windows, ...) model inputs; windows of
    consecutive clips are stacked into calls of ``predict`` of about ``chunk`` windows.
    """
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        counts = [len(x) for x in pending]
        probs = np.asarray(predict(np.concatenate(pending)), dtype=np.float64)  # (sum(counts), n_classes)
        if len(probs) != sum(counts):
            raise ValueError(f"predict returned {len(probs)} rows for {sum(counts)} windows")
        out.extend(part.mean(axis=0) for part in np.split(probs, np.cumsum(counts)[:-1]))
        pending.clear()

    for x in inputs:
        if len(x) == 0:
            raise ValueError("a clip gave no model input")
        pending.append(x)
        if sum(len(p) for p in pending) >= chunk:
            flush()
    if pending:
        flush()
    if not out:
        raise ValueError("no clips to predict")
    return np.stack(out)


def compute_metrics(probs: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Clip probabilities (n, classes) and true indices (n,) -> the eval.json dict.

    Macro F1 and balanced accuracy average over the classes present in the test clips
    or the predictions (scikit-learn's default); per_class lists every model class.
    """
    from sklearn import metrics as skm

    y_pred = probs.argmax(axis=1)
    every = np.arange(len(labels))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=every, zero_division=0)
    p_true = np.clip(probs[np.arange(len(y_true)), y_true], EPSILON, 1.0)
    return {
        "accuracy": round(float(skm.accuracy_score(y_true, y_pred)), 6),
        "balanced_accuracy": round(float(skm.balanced_accuracy_score(y_true, y_pred)), 6),
        "macro_f1": round(float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)), 6),
        "loss": round(float(-np.mean(np.log(p_true))), 6),
        "clips": int(len(y_true)),
        "per_class": {
            label: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                    "f1": round(float(f1[i]), 6), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
    }


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes, classes) int64 counts, rows actual, columns predicted."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def confusion_frame(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """One row per clip, label names (DVC's confusion template: x actual, y predicted)."""
    names = np.asarray(labels, dtype=object)
    return pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})


def misclassified_frame(paths: Sequence[str], probs: np.ndarray, y_true: np.ndarray,
                        labels: Sequence[str]) -> pd.DataFrame:
    """Wrong clips: path, label, predicted, confidence (of the prediction); most confident first."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    names = np.asarray(labels, dtype=object)
    frame = pd.DataFrame({
        "path": np.asarray(paths, dtype=object)[wrong], "label": names[y_true[wrong]],
        "predicted": names[y_pred[wrong]], "confidence": probs[wrong, y_pred[wrong]].round(4),
    })
    return frame.sort_values(["confidence", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)


def report_markdown(metrics: Mapping[str, Any], misclassified: pd.DataFrame, top: int = 10) -> str:
    """reports/eval/report.md: metrics, per-class table, the figures, the worst mistakes."""
    lines = ["# Evaluation on the test split", "", "| metric | value |", "|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "clips"):
        value = metrics[key]
        lines.append(f"| {key} | {value if isinstance(value, int) else f'{value:.4f}'} |")
    lines += ["", "## Per class", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for label, row in metrics["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    lines += ["", "## Confusion matrix", "", "![Confusion matrix](confusion.png)", "",
              "## Training curves", "", "![Training curves](../train/curves.png)", "",
              f"## Most confident mistakes ({len(misclassified)} misclassified in all)", ""]
    if misclassified.empty:
        lines.append("None.")
    else:
        lines += ["| path | label | predicted | confidence |", "|---|---|---|---|"]
        for row in misclassified.head(top).itertuples(index=False):
            cells = [str(v).replace("|", "\\|") for v in (row.path, row.label, row.predicted)]
            lines.append(f"| {' | '.join(cells)} | {row.confidence:.4f} |")
    return "\n".join(lines) + "\n"


def write_reports(metrics_path: Path, reports_dir: Path, paths: Sequence[str], probs: np.ndarray,
                  y_true: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Compute and write eval.json and reports/eval/*; returns the metrics."""
    metrics = compute_metrics(probs, y_true, labels)
    y_pred = probs.argmax(axis=1)
    fileio.fresh_dir(reports_dir)
    fileio.write_json(metrics_path, metrics)
    fileio.write_csv(reports_dir / "confusion.csv", confusion_frame(y_true, y_pred, labels))
    plots.plot_confusion(confusion_counts(y_true, y_pred, len(labels)), labels, reports_dir / "confusion.png")
    wrong = misclassified_frame(paths, probs, y_true, labels)
    fileio.write_csv(reports_dir / "misclassified.csv", wrong)
    fileio.write_text(reports_dir / "report.md", report_markdown(metrics, wrong))
    return metrics


# --- the stage ------------------------------------------------------------------------------


def load_model(model_dir: Path) -> tuple[Any, list[str]]:
    """models/model.keras (safe_mode) and the class order from models/labels.json."""
    import keras

    model_path, labels_path = model_dir / "model.keras", model_dir / "labels.json"
    for path in (model_path, labels_path):
        if not path.is_file():
            raise DataError(f"{path} not found: run the train stage first")
    labels = list(fileio.read_json(labels_path)["labels"])
    model = keras.saving.load_model(model_path, safe_mode=True)
    if model.output_shape[-1] != len(labels):
        raise DataError(f"{model_path} has {model.output_shape[-1]} outputs but {labels_path} lists {len(labels)}")
    return model, labels


def train_run(model_dir: Path) -> str | None:
    """The MLflow run that trained ``model_dir``/model.keras (tag ``model_sha256``), or None with a warning."""
    model_path = model_dir / "model.keras"
    if not model_path.is_file():
        return None  # load_model names the missing file
    digest = fileio.sha256_file(model_path)
    run_id = tracking.find_run("model_sha256", digest)
    if run_id is None:
        log.warning("no MLflow run tagged model_sha256=%s (%s) in %s: evaluation gets a new run", digest[:12],
                    model_path, tracking.tracking_uri())
    return run_id


def checked_inputs(inputs: Iterable[np.ndarray], input_shape: Sequence[int | None],
                   hint: str) -> Iterator[np.ndarray]:
    """Pass ``inputs`` through; DataError when the first one does not fit the model's input."""
    for i, x in enumerate(inputs):
        if i == 0:
            expected = tuple(input_shape[1:])
            if len(x.shape) != len(input_shape) or any(e is not None and e != d for e, d in zip(expected, x.shape[1:])):
                raise DataError(f"test inputs of shape {x.shape[1:]} do not fit model input {expected} ({hint}): "
                                "rerun train after changing these params")
        yield x


def run(*, features_dir: Path, images_dir: Path, split_dir: Path, model_dir: Path, metrics_path: Path,
        reports_dir: Path, arch: str, window_seconds: float, sample_rate: int, spectrogram: SpectrogramParams,
        params: EvaluateParams, all_params: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate models/ on ``split_dir``/test.csv; write outputs; log to the train run.

    ``spectrogram``: the settings the features were made with (window length in frames, silence level).

    The train run is the MLflow run tagged ``model_sha256`` = sha256 of models/model.keras (see
    :func:`train_run`); without one (e.g. another tracking store) evaluation opens a new run.
    """
    run_id = train_run(model_dir)
    with tracking.start_run(run_id=run_id):
        tracking.log_params(all_params)
        test = data.read_split(split_dir, "test")
        if not run_id:
            tracking.set_data_tags([split_dir / "test.csv"])
        model, labels = load_model(model_dir)
        y_true = data.label_indices(test, labels, str(split_dir / "test.csv"))
        frames = data.window_frames(window_seconds, sample_rate, spectrogram.hop_length, spectrogram.n_fft)
        hop = hop_frames(params.hop_seconds, sample_rate, spectrogram.hop_length)
        inputs = (models.model_input(arch, row, features_dir=features_dir, images_dir=images_dir,
                                     window_frames=frames, hop_frames=hop, top_db=spectrogram.top_db)
                  for row in fileio.records(test))

        def predict(x: np.ndarray) -> np.ndarray:  # (windows, ...) -> (windows, classes)
            return model.predict(x, batch_size=params.batch_size, verbose=0)

        shape_hint = f"model.arch={arch}, train.window_seconds={window_seconds}"
        probs = clip_probabilities(checked_inputs(inputs, model.input_shape, shape_hint), predict,
                                   chunk=params.batch_size * 16)
        paths = list(test["path"]) if "path" in test.columns else list(test["id"])
        metrics = write_reports(metrics_path, reports_dir, paths, probs, y_true, labels)
        tracking.log_metrics(metrics, prefix=MLFLOW_PREFIX)
        tracking.log_artifacts([reports_dir])
        tracking.log_artifacts([metrics_path], artifact_path=reports_dir.name)
    log.info("test: accuracy %.4f, macro F1 %.4f, loss %.4f on %d clips", metrics["accuracy"], metrics["macro_f1"],
             metrics["loss"], metrics["clips"])
    return metrics
