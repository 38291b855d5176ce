"""train.py and stages/train.py: params, class weights, schedule; tiny end-to-end runs on synthetic features."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from audiocnn import fileio, packed, tracking
from audiocnn.config import ParamsError, load_section
from audiocnn.errors import DataError
from audiocnn.data import sample_weights
from audiocnn.train import TrainParams
from conftest import REPO, shrink

CLASSES = ("background", "high", "low")
N_MELS = 16
TIMING = ("samples_per_second", "train_seconds")


def synthetic_dataset(root: Path, clips_per_class: dict[str, int], image_size: int = 0, seed: int = 0) -> Path:
    """Pipeline-shaped features: class-dependent mel bands over a noise floor, clips of 20..60 frames.

    Writes the packed features (frames, N_MELS) dB, ``features/meta.json``, ``split/{train,val,test}.csv``
    and, with ``image_size``, ``spectrograms/<label>/<id>.png``.
    """
    rng = np.random.default_rng(seed)
    features, split, images = root / "features", root / "split", root / "spectrograms"
    band = {"background": None, "high": slice(10, 14), "low": slice(2, 6)}
    arrays = {}
    for name, per_class in clips_per_class.items():
        rows = []
        for label in CLASSES:
            for i in range(per_class):
                clip_id = f"{label}-{name}{i:02d}"
                frames = int(rng.integers(20, 61))
                x = rng.normal(-60.0, 4.0, (frames, N_MELS)).astype(np.float32)  # (frames, n_mels) dB
                if band[label] is not None:
                    x[:, band[label]] += 30.0
                x = np.maximum(x, x.max() - 80.0)
                arrays[clip_id] = x
                image = ""
                if image_size:
                    image = f"{label}/{clip_id}.png"
                    pixels = np.clip((x.T[::-1] + 80.0) * 3.0, 0, 255).astype(np.uint8)
                    (images / label).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).convert("RGB").resize((image_size, image_size)).save(images / image)
                rows.append({"id": clip_id, "path": f"{label}/{clip_id}.wav", "label": label, "group": "",
                             "fold": "", "frames": str(frames), "image": image})
        fileio.write_csv(split / f"{name}.csv", pd.DataFrame(rows))
    packed.write(features, arrays)
    fileio.write_json(features / "meta.json", {"sample_rate": 16000, "n_fft": 512, "hop_length": 160,
                                               "n_mels": N_MELS, "fmin": 20.0, "fmax": 8000.0, "top_db": 80.0})
    return root


def tiny_params(params: dict, **train) -> dict:
    """The real params shrunk to a few-second training run on the synthetic features."""
    params["spectrogram"].update(n_mels=N_MELS, image_size=48)
    params["model"].update(width=8)
    params["train"].update({"window_seconds": 0.3, "batch_size": 8, "epochs": 2, "warmup_epochs": 1, **train})
    return params


def run_stage(root: Path, params: dict, out: str = "out") -> dict:
    """Run stages/train.py main() on ``root`` with ``params``; return metrics/train.json."""
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    main = runpy.run_path(str(REPO / "stages" / "train.py"))["main"]
    o = root / out
    main(["--params", str(root / "params.yaml"), "--features", str(root / "features"),
          "--images", str(root / "spectrograms"), "--split", str(root / "split"), "--model", str(o / "models"),
          "--metrics", str(o / "metrics.json"), "--history", str(o / "history.csv"), "--curves", str(o / "curves.png")])
    return fileio.read_json(o / "metrics.json")


def val_batches(root: Path, batch_size: int) -> tuple:
    """(dataset of (centre window, one-hot label) batches, label indices) of ``root``'s val split,
    as validation sees it."""
    from audiocnn import data

    val = data.read_split(root / "split", "val")
    y = data.label_indices(val, list(CLASSES), "val.csv")
    features = packed.open_folder(root / "features")
    return data.eval_dataset(features, features.refs_of(list(val["id"])), y, len(CLASSES), 32, 80.0, batch_size), y


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch) -> Path:
    """A fresh MLflow store and training-backup folder in tmp_path."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("AUDIOCNN_TRAIN_BACKUP_DIR", str(tmp_path / "train-backup"))
    return db


def test_real_section_validates(params):
    settings = load_section(params, "train", TrainParams)
    assert settings.epochs == 2 and settings.augment.noise_snr_db == (5.0, 20.0)


@pytest.mark.parametrize(("key", "value"), [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("window_seconds", 0.0),
                                            ("lr_schedule", "step"), ("warmup_epochs", 5), ("label_smoothing", 1.0)])
def test_bad_values_name_the_key(params, key, value):
    params["train"][key] = value
    with pytest.raises(ParamsError, match=f"train.{key}"):
        load_section(params, "train", TrainParams)


def test_balanced_sample_weights():
    weights = sample_weights(np.array([0, 0, 0, 1]), 2, balanced=True)
    np.testing.assert_allclose(weights, [4 / 6, 4 / 6, 4 / 6, 2.0])
    assert sample_weights(np.array([0, 0, 1]), 2, balanced=False).tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(weights.sum(), 4.0)  # total weight = clips: the loss scale is unchanged


@pytest.mark.parametrize(("schedule", "last"), [("cosine", 0.0), ("constant", 0.01)])
def test_warmup_then_schedule(params, schedule, last):
    import keras

    from audiocnn import models, train

    settings = load_section(tiny_params(params, lr=0.01, lr_schedule=schedule, epochs=4, warmup_epochs=1),
                            "train", TrainParams)
    model = models.build_cnn(3, (31, N_MELS, 1), 8, 0.1)
    train.compile_model(model, settings, steps_per_epoch=10)
    lr = model.optimizer._learning_rate
    values = [float(keras.ops.convert_to_numpy(lr(step))) for step in (0, 5, 10, 25, 40)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.005) and values[2] == pytest.approx(0.01)
    assert values[4] == pytest.approx(last, abs=1e-7)
    assert (values[3] < 0.009) == (schedule == "cosine")


def test_stale_features_and_unknown_noise_class_are_reported(tmp_path, params, mlflow_db):
    root = synthetic_dataset(tmp_path, {"train": 2, "val": 1})
    with pytest.raises(DataError, match="meta.json: n_mels=16"):
        run_stage(root, tiny_params(params) | {"spectrogram": {**params["spectrogram"], "n_mels": 32}})
    params = tiny_params(params)
    params["train"]["augment"]["noise_class"] = "rain"
    with pytest.raises(ParamsError, match="train.augment.noise_class='rain'"):
        run_stage(root, params)


@pytest.mark.slow
def test_stage_trains_writes_every_output_and_is_deterministic(tmp_path, params, mlflow_db):
    import keras
    import mlflow

    root = synthetic_dataset(tmp_path, {"train": 8, "val": 3, "test": 1})
    params = tiny_params(params, epochs=3, lr=0.01)
    first = run_stage(root, params, "a")
    out = root / "a"
    assert set(first) == {"best_epoch", "best_val_loss", "best_val_accuracy", "epochs_run", "parameters"}
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing) == set(TIMING) and timing["samples_per_second"] > 0
    assert first["epochs_run"] == 3 and 1 <= first["best_epoch"] <= 3
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    assert history["epoch"].tolist() == [1, 2, 3] and np.isfinite(history.drop(columns="epoch").values).all()
    # learning itself is test_learns_the_synthetic_bands' job: 3 steps per epoch here are noise
    assert history["lr"].tolist() == pytest.approx([0.01, 0.005, 0.0], abs=1e-6)  # warmup, then cosine to 0
    assert (out / "curves.png").stat().st_size > 0
    labels = json.loads((out / "models" / "labels.json").read_text())["labels"]
    assert labels == list(CLASSES)
    preprocess = json.loads((out / "models" / "preprocess.json").read_text())
    assert preprocess["window_frames"] == 32 and preprocess["spectrogram"]["n_mels"] == N_MELS
    model = keras.models.load_model(out / "models" / "model.keras")
    assert model.count_params() == first["parameters"] and model.output_shape == (None, 3)
    run_id = tracking.find_run("model_sha256", fileio.sha256_file(out / "models" / "model.keras"))
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "3"
    assert run.data.metrics["train/best_epoch"] == first["best_epoch"] and "data_hash" in run.data.tags
    steps = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert len(steps) == 3
    assert pytest.approx(history["val_loss"].min()) == first["best_val_loss"]

    second = run_stage(root, params, "b")  # same params and data: the same numbers
    assert first == second
    pd.testing.assert_frame_equal(history, pd.read_csv(root / "b" / "history.csv"))


@pytest.mark.slow
def test_learns_the_synthetic_bands(tmp_path, params, mlflow_db):
    root = synthetic_dataset(tmp_path, {"train": 16, "val": 4})
    params = tiny_params(params, epochs=8, lr=0.01, patience=8)
    # every augmentation on; masks scaled to the 32 x 16 input (the defaults suit 101 x 64)
    params["train"]["augment"].update(noise_prob=0.5, mixup_alpha=0.2, gain_db=6.0, time_mask_frames=4,
                                      freq_mask_bins=2)
    metrics = run_stage(root, params)
    assert metrics["best_val_accuracy"] >= 0.9


@pytest.mark.slow
def test_seed_arch_trains_on_images(tmp_path, params, mlflow_db):
    import keras

    root = synthetic_dataset(tmp_path, {"train": 4, "val": 2}, image_size=48)
    params = tiny_params(params, epochs=1, warmup_epochs=0)
    params["model"]["arch"] = "seed"
    metrics = run_stage(root, params)
    model = keras.models.load_model(root / "out" / "models" / "model.keras")
    assert model.input_shape == (None, 48, 48, 3) and metrics["epochs_run"] == 1


def test_each_member_gets_its_own_stream_and_member_0_the_single_networks(tmp_path, params):
    from audiocnn import train
    from audiocnn.audio import AudioParams
    from audiocnn.spectrogram import SpectrogramParams

    root = synthetic_dataset(tmp_path, {"train": 8, "val": 3})
    params = tiny_params(params)
    paths = train.TrainPaths(root / "features", root / "spectrograms", root / "split", root / "m", root / "t.json",
                             root / "h.csv", root / "c.png")
    spectrogram = load_section(params, "spectrogram", SpectrogramParams)
    settings = load_section(params, "train", TrainParams)
    frames = train.input_frames(settings, load_section(params, "audio", AudioParams), spectrogram)
    stream = train.build_streams("cnn", paths, settings, frames, spectrogram)[0]
    single, zero, one, two = (next(iter(s)) for s in (stream(0), stream(0, 0), stream(0, 1), stream(0, 2)))
    np.testing.assert_array_equal(zero[0].numpy(), single[0].numpy())  # member 0: the one-network stream
    np.testing.assert_array_equal(zero[1].numpy(), single[1].numpy())
    assert not np.allclose(zero[0].numpy(), one[0].numpy()) and not np.allclose(one[0].numpy(), two[0].numpy())


def test_members_train_one_after_another_and_the_saved_mean_is_what_validation_scored(tmp_path, params,
                                                                                        mlflow_db):
    import keras

    root = synthetic_dataset(tmp_path, {"train": 8, "val": 3})
    params = tiny_params(params, epochs=3, lr=0.01)
    one = run_stage(root, params, "one")
    params["model"]["members"] = 2
    metrics = run_stage(root, params, "two")
    assert metrics["parameters"] == 2 * one["parameters"]
    model = keras.models.load_model(root / "two" / "models" / "model.keras", safe_mode=True)
    assert [layer.name for layer in model.layers if layer.name.startswith("member")] == ["member0", "member1"]
    single = keras.models.load_model(root / "one" / "models" / "model.keras", safe_mode=True)
    for a, b in zip(model.get_layer("member0").get_weights(), single.get_weights()):
        np.testing.assert_array_equal(a, b)  # network 0 is the one-network training, bit for bit
    assert metrics["members"]["member0"] == {k: v for k, v in one.items() if k != "parameters"}
    assert metrics["members"]["member1"] != metrics["members"]["member0"]  # its own seeds
    history = pd.read_csv(root / "two" / "history.csv")
    assert history["member"].tolist() == [0] * 3 + [1] * 3 and metrics["epochs_run"] == 6
    ds, y = val_batches(root, 8)
    probs = model.predict(ds, verbose=0)  # (clips, classes): the mean of the two networks'
    assert float((probs.argmax(axis=1) == y).mean()) == pytest.approx(metrics["best_val_accuracy"])
    smoothing = params["train"]["label_smoothing"]
    smoothed = keras.utils.to_categorical(y, len(CLASSES)) * (1 - smoothing) + smoothing / len(CLASSES)
    loss = float(-(smoothed * np.log(np.clip(probs, 1e-7, 1.0))).sum(axis=1).mean())
    assert loss == pytest.approx(metrics["best_val_loss"], rel=1e-4)


@pytest.mark.parametrize("key, values, views", [("test_warps", [0.9, 1.0, 1.1], (0.9, 1.0, 1.1)),
                                                 ("test_stretches", [0.9, 1.0, 1.1], (0.9, 1.0, 1.1)),
                                                 ("test_shifts", [0.0, 0.05, 0.1], (0, 5, 10))])
def test_test_time_scaling_saves_the_average_and_scores_it_on_validation(tmp_path, params, mlflow_db, key, values,
                                                                         views):
    """model.test_warps / test_stretches / test_shifts: the same training; the saved model averages over the
    scaled or shifted windows (warp_average / stretch_average / shift_average of the one network, shifts in
    frames: 0.05 s is 5 hops of 10 ms); val scores are the saved model's."""
    import keras

    from audiocnn import models

    average = {"test_warps": models.warp_average, "test_stretches": models.stretch_average,
               "test_shifts": models.shift_average}[key]
    root = synthetic_dataset(tmp_path, {"train": 8, "val": 3})
    params = tiny_params(params, epochs=2, lr=0.01)
    one = run_stage(root, params, "one")
    params["model"][key] = values
    metrics = run_stage(root, params, "scaled")
    assert metrics["without_warps"] == {k: one[k] for k in ("best_val_loss", "best_val_accuracy")}
    assert metrics["parameters"] == one["parameters"] and metrics["best_epoch"] == one["best_epoch"]
    if key != "test_warps":
        assert metrics["best_val_loss"] != one["best_val_loss"]
    model = keras.models.load_model(root / "scaled" / "models" / "model.keras", safe_mode=True)
    single = keras.models.load_model(root / "one" / "models" / "model.keras", safe_mode=True)
    ds, y = val_batches(root, 8)
    x = np.concatenate([batch.numpy() for batch, _ in ds])
    expected = average(single, views, "check").predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)  # the one network, scaled
    assert float((expected.argmax(axis=1) == y).mean()) == pytest.approx(metrics["best_val_accuracy"])


@pytest.mark.parametrize("shifts", [[0.0, 0.32], [0.05, 0.052]])
def test_test_shifts_outside_the_window_or_alike_in_frames_are_refused_before_training(tmp_path, params, mlflow_db,
                                                                                        shifts):
    """0.32 s is 32 frames, the whole 0.3 s window; 0.05 and 0.052 s both round to 5 frames."""
    root = synthetic_dataset(tmp_path, {"train": 8, "val": 3})
    params = tiny_params(params)
    params["model"]["test_shifts"] = shifts
    with pytest.raises(ParamsError, match=r"model\.test_shifts=.*train\.window_seconds"):
        run_stage(root, params)
    assert not (root / "out" / "models").exists()


def test_val_scores_count_as_keras_validation_does(tmp_path, params, mlflow_db):
    """The ensemble's val loss/accuracy (train.val_scores) on one network equal Keras' own at its best epoch."""
    import keras

    from audiocnn import train

    root = synthetic_dataset(tmp_path, {"train": 8, "val": 5})
    params = tiny_params(params, epochs=2, lr=0.01)
    metrics = run_stage(root, params)
    model = keras.models.load_model(root / "out" / "models" / "model.keras", safe_mode=True)
    ds, _ = val_batches(root, 4)
    loss, accuracy = train.val_scores(model, ds, load_section(params, "train", TrainParams))
    assert loss == pytest.approx(metrics["best_val_loss"], rel=1e-5)
    assert accuracy == pytest.approx(metrics["best_val_accuracy"])


def test_restore_best_false_saves_the_final_epoch_and_names_it_in_the_metrics(tmp_path, params, mlflow_db):
    """train.restore_best false: the same training; the saved weights are the last epoch's, and
    metrics/train.json reports that epoch under final_* (with test-time warps: the saved model's)."""
    import keras

    from audiocnn import train

    root = synthetic_dataset(tmp_path, {"train": 8, "val": 5})
    params = tiny_params(params, epochs=4, lr=0.05, lr_schedule="constant", patience=4)  # val_loss lowest at epoch 1
    best = run_stage(root, params, "best")
    params["train"]["restore_best"] = False
    final = run_stage(root, params, "final")
    history = pd.read_csv(root / "final" / "history.csv")
    pd.testing.assert_frame_equal(history, pd.read_csv(root / "best" / "history.csv"))  # training unchanged
    assert set(final) == {"final_epoch", "final_val_loss", "final_val_accuracy", "epochs_run", "parameters"}
    assert final["final_epoch"] == final["epochs_run"] == 4
    assert best["best_epoch"] == history["val_loss"].idxmin() + 1 < 4  # else both would save the same weights
    assert final["final_val_loss"] == pytest.approx(history["val_loss"].iloc[-1])
    model = keras.models.load_model(root / "final" / "models" / "model.keras", safe_mode=True)
    ds, _ = val_batches(root, 4)
    loss, accuracy = train.val_scores(model, ds, load_section(params, "train", TrainParams))
    assert loss == pytest.approx(final["final_val_loss"], rel=1e-5)  # the saved weights are the last epoch's
    assert accuracy == pytest.approx(final["final_val_accuracy"])
    params["model"]["test_warps"] = [0.9, 1.0, 1.1]
    warped = run_stage(root, params, "warped")
    assert warped["without_warps"] == {k: final[k] for k in ("final_val_loss", "final_val_accuracy")}
    assert warped["final_epoch"] == 4 and "best_val_loss" not in warped
