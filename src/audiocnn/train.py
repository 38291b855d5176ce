"""Training (params section ``train``): streams, optimizer, fit, and every output of the train stage.

Deterministic on CPU: ``keras.utils.set_random_seed`` + op determinism, shuffles and
stateless per-example augmentation seeded per (train.seed, epoch), so the same params and data
give the same weights and metrics (timings aside) on the same CPU with the same intra-op thread
count and oneDNN setting. Resumable: a training killed after k epochs restarts at epoch k+1
(audiocnn.checkpoint) and ends as the uninterrupted one would have. AdamW with a cosine or constant schedule after a linear warmup
(both are Keras' CosineDecay: alpha 1 keeps it constant), label smoothing, balanced class
weights as sample weights, early stopping on val_loss that restores the best weights
(``train.restore_best: false`` keeps the final epoch's: what a validation set that cannot pick
the epoch, e.g. one of the training speakers' clips, leaves a speaker-independent test; the val
scores in metrics/train.json are then the final epoch's, under ``final_*`` instead of ``best_*``).
``model.members`` > 1: that many networks trained one after another, network k exactly as one
network would be with train.seed + k (initial weights, shuffles, augmentation), each with its own
early stopping and backup; the saved model averages their probabilities (models.ensemble).
``model.test_warps``: the saved model averages over frequency-warped copies of its input
(models.warp_average); training is unchanged, and the val scores in metrics/train.json are the saved model's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np
import pandas as pd

from audiocnn import data, fileio, packed
from audiocnn.augment import AugmentParams
from audiocnn.config import ParamsError, check, to_dict
from audiocnn.errors import DataError
from audiocnn.modelfile import write_model_dir  # noqa: F401  (callers use train.write_model_dir)
from audiocnn.models import ModelParams

if TYPE_CHECKING:
    import keras

    from audiocnn.audio import AudioParams
    from audiocnn.checkpoint import Backup, TrainState
    from audiocnn.normalize import NormalizeParams
    from audiocnn.spectrogram import SpectrogramParams

log = logging.getLogger(__name__)

NORM_SAMPLE_CLIPS = 256  # training clips whose centre windows set the cnn's input normalization
MIN_WINDOW_FRAMES = 8
EPOCH_SEED_STRIDE = 100  # epoch seeds lie this far apart, so seeds derived from one epoch's never meet the next's
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")


@dataclass(frozen=True)
class TrainParams:
    """``train``: optimization, input window and augmentation."""

    epochs: int
    batch_size: int
    lr: float  # peak learning rate (after warmup)
    lr_schedule: Literal["cosine", "constant"]
    warmup_epochs: int  # linear warmup from 0, per step
    weight_decay: float  # AdamW decoupled weight decay
    label_smoothing: float
    window_seconds: float  # model input length
    patience: int  # epochs without val_loss improvement before stopping
    restore_best: bool  # the saved weights: the lowest val_loss epoch's (True) or the final epoch's (False)
    class_weights: bool  # balanced sample weights from the training label counts
    shuffle_buffer: int  # clips (file paths) in the shuffle buffer
    seed: int
    augment: AugmentParams

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", self.warmup_epochs, "must be within 0..epochs")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        check(self.window_seconds > 0, "window_seconds", self.window_seconds, "must be > 0")
        check(self.patience >= 0, "patience", self.patience, "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(0 <= self.seed < 2**31, "seed", self.seed, "must be within 0..2**31-1")


@dataclass(frozen=True)
class TrainPaths:
    """Inputs and outputs of the train stage, as dvc.yaml passes them."""

    features: Path
    images: Path
    split: Path
    model_dir: Path
    metrics: Path
    history: Path
    curves: Path


def input_frames(params: TrainParams, audio: "AudioParams", spectrogram: "SpectrogramParams") -> int:
    """Window frames of the model input; ParamsError naming the keys when too short for the cnn."""
    frames = data.window_frames(params.window_seconds, audio.sample_rate, spectrogram.hop_length, spectrogram.n_fft)
    if frames < MIN_WINDOW_FRAMES:
        raise ParamsError(f"train.window_seconds={params.window_seconds} gives {frames} frames at "
                          f"audio.sample_rate={audio.sample_rate}, spectrogram.hop_length={spectrogram.hop_length}; "
                          f"need >= {MIN_WINDOW_FRAMES}")
    return frames


def shift_frames(model_params: ModelParams, audio: "AudioParams", spectrogram: "SpectrogramParams",
                 frames: int) -> list[int]:
    """``model.test_shifts`` (s) in frames of the window; ParamsError naming the keys when a shift leaves
    nothing of the window or two shifts round to the same frames."""
    shifts = [int(round(s * audio.sample_rate / spectrogram.hop_length)) for s in model_params.test_shifts]
    if any(k >= frames for k in shifts) or len(set(shifts)) < len(shifts):
        raise ParamsError(f"model.test_shifts={list(model_params.test_shifts)} are {shifts} frames at "
                          f"audio.sample_rate={audio.sample_rate}, spectrogram.hop_length={spectrogram.hop_length}: "
                          f"each must be under the window's {frames} frames (train.window_seconds) and no two the same")
    return shifts


def check_features(features_dir: Path, audio: "AudioParams", spectrogram: "SpectrogramParams") -> None:
    """DataError when ``meta.json`` shows the features were made with other settings (a stale stage)."""
    meta_path = features_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: run the spectrogram stage")
    meta = fileio.read_json(meta_path)
    expected = {"sample_rate": audio.sample_rate, "hop_length": spectrogram.hop_length, "n_mels": spectrogram.n_mels}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise DataError(f"{meta_path}: {key}={meta.get(key)!r} but params say {value!r}: rerun the spectrogram stage")


def build_streams(arch: str, paths: TrainPaths, params: TrainParams, frames: int, spectrogram: "SpectrogramParams"):
    """(train stream factory, val dataset of (x, y), labels, training clips, normalization sample or None).

    ``train_stream(first_epoch, member=0)`` gives the (x, y, w) batches of epochs
    first_epoch..train.epochs-1, each epoch's shuffle, crops, noise and augmentation drawn from
    ``epoch_seed(train.seed + member, epoch)``: a training resumed at epoch k sees exactly the
    batches the uninterrupted one saw from epoch k, and an ensemble's network k sees the stream
    of a one-network training with train.seed + k.
    """
    import tensorflow as tf

    from audiocnn import augment

    image_size, top_db = spectrogram.image_size, spectrogram.top_db
    train_frame, val_frame = data.read_split(paths.split, "train"), data.read_split(paths.split, "val")
    labels = data.class_labels(train_frame)
    if len(labels) < 2:
        raise DataError(f"{paths.split / 'train.csv'}: {len(labels)} class(es); need at least 2")
    y_train = data.label_indices(train_frame, labels, str(paths.split / "train.csv"))
    y_val = data.label_indices(val_frame, labels, str(paths.split / "val.csv"))
    weights = data.sample_weights(y_train, len(labels), params.class_weights)
    p = params.augment
    noise = None  # (n, 2) refs of the noise clips

    if arch == "seed":  # images: no dB-domain augmentation (masks, gain, noise); mixup still applies
        train_clips, val_clips = (data.image_files(paths.images, f) for f in (train_frame, val_frame))
        def transform(path, label, weight, seed):  # noqa: E306
            return data.load_png_tf(path, image_size), tf.one_hot(label, len(labels)), weight
        norm_sample = None
        val_ds = data.image_dataset(val_clips, y_val, len(labels), image_size).batch(params.batch_size)
    else:
        features = packed.open_folder(paths.features)
        train_clips, val_clips = (features.refs_of(list(f["id"])) for f in (train_frame, val_frame))  # (n, 2) each
        noise_label = augment.noise_label(p, labels) if p.noise_prob > 0 else -1
        if p.noise_prob > 0:
            noise = train_clips[(y_train == noise_label) | (noise_label < 0)]
        transform = augment.window_transform(features, p, frames, top_db, len(labels), noise_label)
        norm_sample = data.feature_sample(features, train_clips, frames, top_db, NORM_SAMPLE_CLIPS, params.seed)
        val_ds = data.eval_dataset(features, val_clips, y_val, len(labels), frames, top_db, params.batch_size)

    mix = (lambda x, y, w, s: augment.mixup(x, y, w, s, p.mixup_alpha)) if p.mixup_alpha > 0 else None
    items = tf.data.Dataset.from_tensor_slices((train_clips, y_train, weights))

    def train_stream(first_epoch: int, member: int = 0) -> tf.data.Dataset:
        def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:  # epoch: int64 scalar
            seed = epoch_seed(params.seed + member, epoch)
            side = data.noise_stream(features, noise, frames, top_db, seed + 10) if noise is not None else None
            return data.train_stream(items, params.shuffle_buffer, seed, transform, params.batch_size, mix, side)

        return tf.data.Dataset.range(first_epoch, params.epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)

    log.info("train: %d clips, val: %d clips, %d classes, arch %s", len(train_clips), len(val_clips), len(labels), arch)
    return train_stream, val_ds, labels, len(train_clips), norm_sample


def epoch_seed(seed: int, epoch: Any) -> Any:
    """The data seed of one epoch (python int or int64 tensor); data.py derives seed+1, +2, +10, +11 from it."""
    return seed * EPOCH_SEED_STRIDE * 1000 + epoch * EPOCH_SEED_STRIDE


def compile_model(model: "keras.Model", params: TrainParams, steps_per_epoch: int) -> None:
    """AdamW on linear warmup then cosine decay to 0 (or constant), label-smoothed cross-entropy."""
    import keras

    warmup = params.warmup_epochs * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else params.lr,
        decay_steps=max(params.epochs * steps_per_epoch - warmup, 1),
        alpha=0.0 if params.lr_schedule == "cosine" else 1.0,
        warmup_target=params.lr if warmup else None, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=params.weight_decay),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


@dataclass
class NetworkFit:
    """One trained network (the best or the final epoch's weights, train.restore_best) and how its training went."""

    network: "keras.Model"
    history: pd.DataFrame  # HISTORY_COLUMNS, one row per epoch
    seconds: float  # the fit, wall time
    samples_per_second: float


def train(paths: TrainPaths, raw_params: Mapping[str, Any], audio: "AudioParams", normalize: "NormalizeParams",
          spectrogram: "SpectrogramParams", model_params: ModelParams, params: TrainParams) -> dict[str, Any]:
    """Train, write models/, metrics, history and curves, and log it all to one MLflow run; return the metrics.

    Resumable (audiocnn.checkpoint): a run killed after k epochs continues from epoch k+1 in the
    same MLflow run (tag ``resumed_at_epoch``), and ends with the model and metrics of an
    uninterrupted run; an ensemble keeps each network's backup until the whole model is written,
    so finished networks are not trained again. The MLflow run is tagged ``model_sha256`` (of
    model.keras): evaluate finds it so.
    """
    import keras
    import tensorflow as tf

    from audiocnn import checkpoint, modelfile, models, plots, tracking

    frames = input_frames(params, audio, spectrogram)
    shifts = shift_frames(model_params, audio, spectrogram, frames)
    check_features(paths.features, audio, spectrogram)
    keras.backend.clear_session()
    keras.utils.set_random_seed(params.seed)  # python, numpy, tf and keras seeds
    tf.config.experimental.enable_op_determinism()
    train_stream, val_ds, labels, n_train, norm_sample = build_streams(
        model_params.arch, paths, params, frames, spectrogram)
    shape = (spectrogram.image_size,) * 2 + (3,) if model_params.arch == "seed" else (frames, spectrogram.n_mels, 1)
    steps = math.ceil(n_train / params.batch_size)  # one pass over the training clips
    members = model_params.members
    networks = []
    for k in range(members):
        if k:  # network 0 is built as a one-network training builds its model
            keras.utils.set_random_seed(params.seed + k)
        name = None if members == 1 else models.member_name(k)
        networks.append(models.build(model_params, len(labels), shape, norm_sample, name=name))
        compile_model(networks[-1], params, steps)
    log.info("model %s x %d: %d parameters, input %s", model_params.arch, members,
             sum(net.count_params() for net in networks), shape)

    split_files = [p for p in (paths.split / f"{n}.csv" for n in data.SPLITS) if p.is_file()]
    key = checkpoint.training_key(raw_params, [*split_files, paths.features / "meta.json"])
    root = checkpoint.backup_root(tracking.repo_root())
    backups = [checkpoint.Backup.open(root, key if members == 1 else f"{key}-{net.name}") for net in networks]
    try:
        states = [backup.load(net) or checkpoint.TrainState() for backup, net in zip(backups, networks)]
        run_id = backups[0].run_id()
        if run_id and not tracking.run_exists(run_id):
            run_id = None
        with tracking.start_run(run_id=run_id) as run:
            backups[0].set_run_id(run.info.run_id)
            tracking.log_params(raw_params)
            tracking.set_data_tags(split_files)
            tracking.set_tags(tracking.environment_tags())
            fits = [fit_network(net, params, n_train, steps, train_stream, val_ds, backup, state, member=k,
                                log_prefix="" if members == 1 else f"{net.name}/")
                    for k, (net, backup, state) in enumerate(zip(networks, backups, states))]
            model = fits[0].network if members == 1 else models.ensemble(
                [fit.network for fit in fits], f"{model_params.arch}_ensemble")
            history = member_history(fits)
            average = val_scores(model, val_ds, params) if members > 1 else None  # the saved ensemble's
            metrics = train_metrics(history, model, average, params.restore_best)
            if model_params.test_warps:
                model = models.warp_average(model, model_params.test_warps, f"{model.name}_warped")
            if model_params.test_stretches:
                model = models.stretch_average(model, model_params.test_stretches, f"{model.name}_stretched")
            if shifts:
                model = models.shift_average(model, shifts, f"{model.name}_shifted")
            if model_params.test_warps or model_params.test_stretches or shifts:
                metrics = warped_metrics(metrics, val_scores(model, val_ds, params))
            # Timings vary run to run: MLflow and a side file, never metrics/train.json (kept byte-reproducible).
            timing = {"samples_per_second": round(sum(fit.samples_per_second for fit in fits) / members, 1),
                      "train_seconds": round(sum(fit.seconds for fit in fits), 1)}  # all networks' fits
            preprocess = {"audio": to_dict(audio), "normalize": to_dict(normalize), "spectrogram": to_dict(spectrogram),
                          "window_seconds": params.window_seconds, "window_frames": frames, "arch": model_params.arch}
            model_sha256 = modelfile.write_model_dir(paths.model_dir, model, labels, preprocess)
            tracking.set_tags({"model_sha256": model_sha256})
            fileio.write_json(paths.metrics, metrics)
            fileio.write_csv(paths.history, history)
            plots.plot_history(history, paths.curves)
            fileio.write_json(paths.history.with_name("timing.json"), timing)  # undeclared, git-ignored
            tracking.log_metrics(metrics, prefix="train/")
            tracking.log_metrics(timing, prefix="train/")
            tracking.log_keras_model(model, labels)
            tracking.log_artifacts([paths.model_dir / "preprocess.json", paths.metrics, paths.history, paths.curves])
        for backup in backups:
            backup.remove()
    finally:
        for backup in backups:
            backup.close()
    kept = kept_epoch(params.restore_best)
    log.info("saved %s (%s epoch): val_loss %.4f, val_accuracy %.4f; %.0f samples/s", model.name, kept,
             metrics[f"{kept}_val_loss"], metrics[f"{kept}_val_accuracy"], timing["samples_per_second"])
    return metrics


def fit_network(network: "keras.Model", params: TrainParams, n_train: int, steps: int, train_stream: Any,
                val_ds: Any, backup: "Backup", state: "TrainState", member: int, log_prefix: str) -> NetworkFit:
    """Fit one compiled network on stream ``member`` (seeds train.seed + member), from ``state`` (a backup's
    epochs, or none) saving every epoch to ``backup``; early stopping restores the best epoch's weights
    unless train.restore_best is false.
    MLflow's per-epoch metrics and the resume tag are named ``log_prefix`` + key."""
    import keras
    import tensorflow as tf

    from audiocnn import checkpoint, tracking

    if state.epochs_done:
        log.info("resuming training%s after epoch %d/%d from %s", f" of {network.name}" if log_prefix else "",
                 state.epochs_done, params.epochs, backup.folder)
        tracking.set_tags({f"{log_prefix}resumed_at_epoch": state.epochs_done})
    epoch_log = epoch_logger(n_train, params.epochs)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=params.patience,
                                         restore_best_weights=params.restore_best)
    started = time.perf_counter()
    tf.random.set_seed(params.seed + member)  # tf.data's seeded shuffles also read the global seed
    # one pipeline for the whole fit (Keras keeps the iterator across epochs with steps_per_epoch)
    network.fit(train_stream(state.epochs_done, member), steps_per_epoch=steps, validation_data=val_ds,
                initial_epoch=state.epochs_done,
                epochs=state.epochs_done if state.stopped else params.epochs,
                verbose=0, shuffle=False,  # epoch_log first: adds "lr"; the checkpoint last: saves it all
                callbacks=[epoch_log, stop, tracking.epoch_logger(log_prefix), checkpoint.callback(backup, stop, state)])
    history = pd.DataFrame(state.rows)[list(HISTORY_COLUMNS)].astype({"epoch": int})
    scores, kept = train_metrics(history, network, restore_best=params.restore_best), kept_epoch(params.restore_best)
    log.info("%s%s epoch %d/%d: val_loss %.4f, val_accuracy %.4f", f"{network.name}: " if log_prefix else "", kept,
             scores[f"{kept}_epoch"], scores["epochs_run"], scores[f"{kept}_val_loss"], scores[f"{kept}_val_accuracy"])
    return NetworkFit(network, history, time.perf_counter() - started, epoch_log.samples_per_second())


def member_history(fits: list[NetworkFit]) -> pd.DataFrame:
    """history.csv: one network's epochs, or every network's with a leading ``member`` column (0-based)."""
    if len(fits) == 1:
        return fits[0].history
    return pd.concat([fit.history.assign(member=k) for k, fit in enumerate(fits)], ignore_index=True)[
        ["member", *HISTORY_COLUMNS]]


def val_scores(model: "keras.Model", val_ds: Any, params: TrainParams) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on the (x, one-hot y) val batches, as Keras' val_loss/val_accuracy count them."""
    import keras

    loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing, reduction="sum")
    total_loss, correct, count = 0.0, 0, 0
    for x, y in val_ds:
        probs = model(x, training=False)  # (batch, classes)
        total_loss += float(keras.ops.convert_to_numpy(loss(y, probs)))
        predicted, actual = (keras.ops.convert_to_numpy(t).argmax(axis=1) for t in (probs, y))
        correct += int((predicted == actual).sum())
        count += len(probs)
    return total_loss / count, correct / count


def kept_epoch(restore_best: bool) -> str:
    """The metrics' name for the epoch whose weights are saved: "best" (lowest val_loss) or "final"."""
    return "best" if restore_best else "final"


def train_metrics(history: pd.DataFrame, model: "keras.Model", average: tuple[float, float] | None = None,
                  restore_best: bool = True) -> dict[str, Any]:
    """metrics/train.json from the history: the epoch whose weights were kept, by val_loss (``best_*``,
    what early stopping restores) or the last one run (``final_*``, train.restore_best false).

    An ensemble's history (a ``member`` column): each network's kept epoch and scores under
    ``members.<name>``, epochs_run summed over the networks, and the val (loss, accuracy) of the
    saved average, ``average``, as <kept>_val_loss and <kept>_val_accuracy.
    """
    kept = kept_epoch(restore_best)
    if "member" not in history:
        row = int(history["val_loss"].idxmin()) if restore_best else len(history) - 1
        return {f"{kept}_epoch": row + 1, f"{kept}_val_loss": float(history["val_loss"][row]),
                f"{kept}_val_accuracy": float(history["val_accuracy"][row]), "epochs_run": len(history),
                "parameters": int(model.count_params())}
    from audiocnn import models

    each = {models.member_name(int(k)): train_metrics(rows.drop(columns="member").reset_index(drop=True), model,
                                                      restore_best=restore_best)
            for k, rows in history.groupby("member")}
    for scores in each.values():
        del scores["parameters"]
    loss, accuracy = average
    return {f"{kept}_val_loss": loss, f"{kept}_val_accuracy": accuracy, "epochs_run": len(history),
            "parameters": int(model.count_params()), "members": each}


def warped_metrics(metrics: Mapping[str, Any], warped: tuple[float, float]) -> dict[str, Any]:
    """``metrics`` of the saved model when it averages over test-time warps, stretches or shifts
    (``model.test_warps``, ``model.test_stretches``, ``model.test_shifts``).

    <kept>_val_loss and <kept>_val_accuracy (best or final) become the saved model's, ``warped``
    (loss, accuracy) on the same val batches; the trained network's own (no test-time scaling) stay
    under ``without_warps``.
    """
    kept = "best" if "best_val_loss" in metrics else "final"
    keys = (f"{kept}_val_loss", f"{kept}_val_accuracy")
    return {**metrics, **dict(zip(keys, warped)), "without_warps": {key: metrics[key] for key in keys}}


def epoch_logger(n_train: int, epochs: int) -> Any:
    """A callback that adds ``lr`` to the epoch logs, logs one line per epoch and times the training passes."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []  # per epoch, training pass only (until validation starts)
            self._start = self._val_start = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start, self._val_start = time.perf_counter(), 0.0

        def on_test_begin(self, logs: Any = None) -> None:
            self._val_start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append((self._val_start or time.perf_counter()) - self._start)
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            log.info("epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))

        def samples_per_second(self) -> float:
            """Training throughput, leaving out the first epoch (graph tracing) when there are more; 0 if none ran."""
            seconds = self.seconds[1:] or self.seconds
            return n_train * len(seconds) / sum(seconds) if seconds else 0.0

    return EpochLog()
