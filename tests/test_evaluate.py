"""Evaluation: metrics against hand-computed values, window averaging, report formats, the stage."""

from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from audiocnn import config, evaluate, fileio, models, packed, tracking
from audiocnn.errors import DataError
from audiocnn.spectrogram import SpectrogramParams
from conftest import REPO, real_params

LABELS = ["a", "b", "c"]
# 4 clips: a->a, a->b (wrong), b->b, c->c
PROBS = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
Y_TRUE = np.array([0, 0, 1, 2])


def test_params_validate():
    params = config.load_section(real_params(), "evaluate", evaluate.EvaluateParams)
    assert params.hop_seconds > 0 and params.batch_size >= 1
    with pytest.raises(config.ParamsError, match="evaluate.hop_seconds=0"):
        config.load_section({"evaluate": {"hop_seconds": 0, "batch_size": 8}}, "evaluate", evaluate.EvaluateParams)
    with pytest.raises(config.ParamsError, match="evaluate.batch_size=0"):
        config.load_section({"evaluate": {"hop_seconds": 0.5, "batch_size": 0}}, "evaluate", evaluate.EvaluateParams)


def test_hop_frames():
    assert evaluate.hop_frames(0.5, 16000, 160) == 50
    assert evaluate.hop_frames(0.001, 16000, 160) == 1


def test_metrics_hand_computed():
    m = evaluate.compute_metrics(PROBS, Y_TRUE, LABELS)
    assert m["accuracy"] == 0.75 and m["clips"] == 4
    # recalls a 1/2, b 1, c 1; precisions a 1, b 1/2, c 1; f1 a 2/3, b 2/3, c 1
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-6)
    assert m["macro_f1"] == pytest.approx(7 / 9, abs=1e-6)
    assert m["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.2) + math.log(0.8) + math.log(0.4)) / 4, abs=1e-6)
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3, abs=1e-6), "support": 2}
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["c"]["f1"] == 1.0
    assert list(m["per_class"]) == LABELS


def test_loss_floor_for_zero_probability():
    m = evaluate.compute_metrics(np.array([[1.0, 0.0]]), np.array([1]), ["x", "y"])
    assert m["loss"] == pytest.approx(-math.log(evaluate.EPSILON), abs=1e-4)
    assert m["per_class"]["x"]["support"] == 0 and m["per_class"]["y"]["recall"] == 0.0


def window_predict(calls: list[int]):
    """Fake model: window -> [m, 1 - m], m = the window's mean value."""
    def predict(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        m = x.reshape(len(x), -1).mean(axis=1)
        return np.stack([m, 1 - m], axis=1)
    return predict


def test_clip_prediction_is_mean_over_its_windows(tmp_path):
    ramp = np.linspace(0, 1, 10, dtype=np.float32)[:, None].repeat(2, axis=1)  # (10 frames, 2 mels)
    short = np.full((2, 2), 0.5, dtype=np.float32)
    short[0, 0] = 0.1  # peak 0.5: with top_db 0.4 the padded frames take silence = 0.1
    packed.write(tmp_path, {"long": ramp, "short": short})
    rows = [{"id": "long", "image": ""}, {"id": "short", "image": ""}]
    inputs = [models.model_input("cnn", r, features_dir=tmp_path, images_dir=tmp_path, window_frames=4,
                                 hop_frames=3, top_db=0.4) for r in rows]
    assert inputs[0].shape == (3, 4, 2, 1)  # starts 0, 3, 6: the last window ends at the clip's end
    calls: list[int] = []
    probs = evaluate.clip_probabilities(iter(inputs), window_predict(calls), chunk=1000)
    expected_long = np.mean([ramp[s : s + 4].mean() for s in (0, 3, 6)])
    padded = np.vstack([short, np.full((2, 2), 0.1)])
    assert probs[0] == pytest.approx([expected_long, 1 - expected_long])
    assert probs[1] == pytest.approx([padded.mean(), 1 - padded.mean()])
    assert calls == [4]  # both clips' windows in one call
    calls.clear()
    assert np.allclose(evaluate.clip_probabilities(iter(inputs), window_predict(calls), chunk=1), probs)
    assert calls == [3, 1]


def test_reports_written(tmp_path):
    paths = ["a/1.wav", "a/2.wav", "b/3.wav", "c/4.wav"]
    probs = PROBS.copy()
    probs[3] = [0.1, 0.9, 0.0]  # second mistake, more confident: listed first
    metrics_path = tmp_path / "metrics" / "eval.json"
    metrics = evaluate.write_reports(metrics_path, tmp_path / "eval", paths, probs, Y_TRUE, LABELS)
    assert json.loads(metrics_path.read_text()) == metrics
    confusion = fileio.read_csv(tmp_path / "eval" / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion.values.tolist() == [["a", "a"], ["a", "b"], ["b", "b"], ["c", "b"]]
    wrong = fileio.read_csv(tmp_path / "eval" / "misclassified.csv")
    assert list(wrong.columns) == ["path", "label", "predicted", "confidence"]
    assert wrong.values.tolist() == [["c/4.wav", "c", "b", "0.9"], ["a/2.wav", "a", "b", "0.5"]]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| accuracy | 0.5000 |" in report and "| b | 0.3333 | 1.0000 | 0.5000 | 1 |" in report
    assert "](confusion.png)" in report and "](../train/curves.png)" in report
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 5000


# --- the stage, with a fake model (no TensorFlow) ---------------------------------------------

SR, HOP, N_FFT = 1000, 10, 20  # window 0.1 s -> 11 frames (1 + (100 + 9) // 10), hop 0.05 s -> 5 frames
SPEC = SpectrogramParams(n_fft=N_FFT, hop_length=HOP, n_mels=4, fmin=0.0, fmax=500.0, top_db=80.0, preemphasis=0.0,
                         workers=1, images=False, image_size=8, gallery_per_class=1)


class BandModel:
    """Predicts the mel band with the most energy (3 bands -> 3 classes), like a Keras model."""

    input_shape = (None, 11, 3, 1)
    output_shape = (None, 3)

    def predict(self, x, batch_size, verbose):
        assert x.shape[1:] == self.input_shape[1:] and verbose == 0
        energy = x.mean(axis=(1, 3)) * 10  # (windows, 3)
        e = np.exp(energy - energy.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def make_dataset(root: Path) -> dict[str, Path]:
    """features (band k loud for class k, packed), split/test.csv, models/labels.json."""
    rows, arrays = [], {}
    for i, (label, frames) in enumerate([("a", 5), ("a", 30), ("b", 11), ("c", 40), ("c", 8)]):
        x = np.zeros((frames, 3), dtype=np.float32)
        band = "abc".index(label) if i != 4 else 1  # clip 4 (c) sounds like b: a mistake
        x[:, band] = 1.0
        arrays[f"clip{i}"] = x
        rows.append({"id": f"clip{i}", "path": f"{label}/clip{i}.wav", "label": label, "image": ""})
    packed.write(root / "features", arrays)
    fileio.write_csv(root / "split" / "test.csv", pd.DataFrame(rows))
    fileio.write_json(root / "models" / "labels.json", {"labels": LABELS})
    return {k: root / k for k in ("features", "split", "models")}


def run_stage(root: Path, dirs: dict[str, Path], window_seconds: float = 0.1) -> dict:
    params = config.load_section({"evaluate": {"hop_seconds": 0.05, "batch_size": 4}}, "evaluate",
                                 evaluate.EvaluateParams)
    return evaluate.run(features_dir=dirs["features"], images_dir=root / "images", split_dir=dirs["split"],
                        model_dir=dirs["models"], metrics_path=root / "metrics" / "eval.json",
                        reports_dir=root / "reports" / "eval", arch="cnn", window_seconds=window_seconds,
                        sample_rate=SR, spectrogram=SPEC, params=params, all_params=real_params())


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def train_runs(models_dir: Path, *tags: dict) -> list[str]:
    """Runs as train makes them, tagged model_sha256 of models/model.keras (here stand-in bytes)."""
    (models_dir / "model.keras").write_bytes(b"stand-in for a saved model")
    ids = []
    for extra in tags:
        with tracking.start_run() as run:
            tracking.set_tags({"model_sha256": fileio.sha256_file(models_dir / "model.keras"), **extra})
            tracking.log_metrics({"loss": 0.9, "accuracy": 0.6}, step=1)
        ids.append(run.info.run_id)
    return ids


def test_stage_resumes_the_train_run(tmp_path, store, monkeypatch):
    dirs = make_dataset(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (BandModel(), LABELS))
    [train_run_id] = train_runs(dirs["models"], {})
    metrics = run_stage(tmp_path, dirs)
    assert metrics["clips"] == 5 and metrics["accuracy"] == 0.8
    assert metrics["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3, abs=1e-6),
                                         "support": 2}
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [train_run_id]
    got = runs[0]
    assert got.info.status == "FINISHED"
    assert got.data.metrics["eval/accuracy"] == 0.8 and got.data.metrics["accuracy"] == 0.6
    assert got.data.metrics["eval/per_class/c/f1"] == pytest.approx(2 / 3, abs=1e-6)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(got.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/report.md", "eval/confusion.csv", "eval/misclassified.csv"} <= artifacts
    wrong = fileio.read_csv(tmp_path / "reports" / "eval" / "misclassified.csv")
    assert wrong[["path", "label", "predicted"]].values.tolist() == [["c/clip4.wav", "c", "b"]]


def test_stage_picks_the_run_of_this_experiment_then_the_latest_finished(tmp_path, store, monkeypatch):
    dirs = make_dataset(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (BandModel(), LABELS))
    mine, finished, latest = train_runs(dirs["models"], {"dvc_exp_name": "mine"}, {}, {})
    mlflow.MlflowClient().set_terminated(latest, "FAILED")
    monkeypatch.setenv("DVC_EXP_NAME", "mine")
    assert evaluate.train_run(dirs["models"]) == mine  # queued experiments with equal models stay apart
    monkeypatch.delenv("DVC_EXP_NAME")
    assert evaluate.train_run(dirs["models"]) == finished


def test_stage_without_a_tagged_run_opens_a_new_run(tmp_path, store, monkeypatch, caplog):
    dirs = make_dataset(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (BandModel(), LABELS))
    (dirs["models"] / "model.keras").write_bytes(b"a model no run has trained")
    run_stage(tmp_path, dirs)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and "data_hash" in run.data.tags and run.data.params["train.lr"] == "0.003"
    assert "no MLflow run tagged model_sha256=" in caplog.text


def test_stage_rejects_a_window_the_model_was_not_trained_on(tmp_path, store, monkeypatch):
    dirs = make_dataset(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (BandModel(), LABELS))
    with pytest.raises(DataError, match="do not fit model input"):
        run_stage(tmp_path, dirs, window_seconds=0.2)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


def test_stage_names_a_test_label_the_model_lacks(tmp_path, store, monkeypatch):
    dirs = make_dataset(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (BandModel(), ["a", "b", "z"]))
    with pytest.raises(DataError, match="test.csv: label"):
        run_stage(tmp_path, dirs)


class ColorModel:
    """``seed`` stand-in: predicts the image's brightest colour channel (3 channels -> 3 classes)."""

    input_shape = (None, 8, 8, 3)
    output_shape = (None, 3)

    def predict(self, x, batch_size, verbose):
        return np.eye(3)[x.mean(axis=(1, 2)).argmax(axis=1)] * 0.9 + 0.1 / 3


def test_stage_seed_arch_uses_one_image_per_clip(tmp_path, store, monkeypatch):
    from PIL import Image

    dirs = make_dataset(tmp_path)
    test = fileio.read_csv(dirs["split"] / "test.csv")
    for i, label in enumerate(test["label"]):
        rgb = np.zeros((8, 8, 3), dtype=np.uint8)
        rgb[..., "abc".index(label)] = 255
        (tmp_path / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "images" / label / f"clip{i}.png")
    test["image"] = [f"{label}/clip{i}.png" for i, label in enumerate(test["label"])]
    fileio.write_csv(dirs["split"] / "test.csv", test)
    monkeypatch.setattr(evaluate, "load_model", lambda d: (ColorModel(), LABELS))
    params = config.load_section({"evaluate": {"hop_seconds": 0.05, "batch_size": 4}}, "evaluate",
                                 evaluate.EvaluateParams)
    metrics = evaluate.run(features_dir=dirs["features"], images_dir=tmp_path / "images", split_dir=dirs["split"],
                           model_dir=dirs["models"], metrics_path=tmp_path / "eval.json",
                           reports_dir=tmp_path / "eval", arch="seed", window_seconds=0.1, sample_rate=SR,
                           spectrogram=SPEC, params=params, all_params=real_params())
    assert metrics["accuracy"] == 1.0 and metrics["loss"] == pytest.approx(-math.log(0.9 + 0.1 / 3), abs=1e-6)


# --- the stage script with a real saved Keras model -------------------------------------------


def test_stage_script_with_saved_keras_model(tmp_path, store, monkeypatch):
    import keras


    dirs = make_dataset(tmp_path)
    inputs = keras.Input((11, 3, 1))
    x = keras.layers.AveragePooling2D(pool_size=(11, 1))(inputs)  # (batch, 1, 3, 1): mean per band
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.Identity(10.0))(x)
    keras.Model(inputs, outputs).save(dirs["models"] / "model.keras")
    params = real_params()
    params["audio"]["sample_rate"] = 8000
    params["spectrogram"].update(hop_length=80, n_fft=160, n_mels=3, fmax=4000.0)
    params["train"]["window_seconds"] = 0.1  # 11 frames
    params["evaluate"]["hop_seconds"] = 0.05
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    main = runpy.run_path(str(REPO / "stages" / "evaluate.py"), run_name="evaluate_stage")["main"]
    main(["--params", str(tmp_path / "params.yaml"), "--features", str(dirs["features"]),
                 "--images", str(tmp_path / "images"), "--split", str(dirs["split"]), "--model", str(dirs["models"]),
                 "--metrics", str(tmp_path / "eval.json"), "--reports", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["accuracy"] == 0.8 and metrics["clips"] == 5
    assert fileio.read_csv(tmp_path / "eval" / "confusion.csv").values.tolist()[-1] == ["c", "b"]
