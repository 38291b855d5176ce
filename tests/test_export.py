"""export and frontend: the in-model log-mel vs librosa, TFLite parity, the parity gate, an end-to-end export."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from audiocnn import cli, data, export, fileio, frontend, packed, predict
from audiocnn.config import ParamsError, load_section
from audiocnn.errors import DataError
from audiocnn.tflite import TFLiteRunner
from conftest import REPO, real_params
from test_predict import LABELS, SAMPLE_RATE, make_model_dir, model_params, write_wav


def preprocess(**spectrogram) -> predict.Preprocess:
    params = model_params()
    params["spectrogram"].update(spectrogram)
    rate = params["audio"]["sample_rate"]
    frames = data.window_frames(0.5, rate, params["spectrogram"]["hop_length"], params["spectrogram"]["n_fft"])
    return predict.read_preprocess({**params, "window_seconds": 0.5, "window_frames": frames}, "test")


def test_preprocess_saved_before_preemphasis_loads_without_it():
    """A model trained before spectrogram.preemphasis existed keeps loading, with no pre-emphasis."""
    params = model_params()
    del params["spectrogram"]["preemphasis"]
    pre = predict.read_preprocess({**params, "window_seconds": 0.5, "window_frames": 51}, "old/preprocess.json")
    assert pre.spectrogram.preemphasis == 0.0
    params["spectrogram"]["preemphasis"] = 2.0
    with pytest.raises(predict.ModelError, match=r"old/preprocess.json.*spectrogram\.preemphasis=2\.0"):
        predict.read_preprocess({**params, "window_seconds": 0.5, "window_frames": 51}, "old/preprocess.json")


def test_export_params_validate():
    settings = load_section(real_params(), "export", export.ExportParams)
    assert settings.int8 and settings.min_top1_agreement == 0.99 and 0 < settings.max_mean_abs_diff <= 0.002
    for key, value in (("calibration_windows", 0), ("min_top1_agreement", 1.5), ("max_int8_accuracy_drop", -0.1)):
        params = real_params()
        params["export"][key] = value
        with pytest.raises(ParamsError, match=f"export.{key}"):
            load_section(params, "export", export.ExportParams)


def test_dft_kernel_is_the_periodic_hann_rfft():
    kernel = frontend.dft_kernel(16)[:, 0, :]  # (n_fft, 2 * bins)
    x = np.random.default_rng(0).normal(size=16)
    spectrum = np.fft.rfft(x * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)))
    np.testing.assert_allclose(x @ kernel, np.concatenate([spectrum.real, spectrum.imag]), atol=1e-5)


@pytest.mark.parametrize("spectrogram", [{}, {"n_fft": 256, "hop_length": 80, "n_mels": 40, "fmin": 0.0,
                                              "fmax": 6000.0, "top_db": 60.0, "preemphasis": 0.97}])
def test_front_end_matches_librosa_log_mel(spectrogram):
    from audiocnn.spectrogram import log_mel

    pre = preprocess(**spectrogram)
    rng = np.random.default_rng(1)
    t = np.arange(pre.window_samples) / SAMPLE_RATE
    click = np.zeros(pre.window_samples)
    click[3000] = 0.9
    waves = np.stack([0.1 * rng.normal(size=t.size), 0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.normal(size=t.size),
                      click, 0.99 * np.sign(np.sin(2 * np.pi * 97 * t))]).astype(np.float32)  # (4, samples)
    segments = np.stack([predict.waveform_segment(w, 0, pre) for w in waves])  # each wave a clip of its own
    ours = np.asarray(frontend.front_end(pre)(segments))[..., 0]  # (4, frames, n_mels) dB
    for got, wave in zip(ours, waves):
        expected = log_mel(wave, SAMPLE_RATE, pre.spectrogram)
        assert got.shape == expected.shape == (pre.window_frames, pre.spectrogram.n_mels)
        assert np.abs(got - expected).max() < 1e-3  # dB


def test_front_end_on_a_segment_gives_the_clips_own_frames():
    """A window inside a longer clip, with its context: the frames evaluate slices from the clip's log-mel."""
    from audiocnn.spectrogram import log_mel

    pre = preprocess()
    hop = pre.spectrogram.hop_length
    rng = np.random.default_rng(3)
    clip = (0.2 * rng.normal(size=3 * pre.window_samples) * np.linspace(0.05, 1, 3 * pre.window_samples))
    clip = clip.astype(np.float32)
    whole = log_mel(clip, SAMPLE_RATE, pre.spectrogram)  # (frames, n_mels), floored at the clip's max - top_db
    starts = [0, 37, len(whole) - pre.window_frames]  # the clip's start, inside, its end
    segments = np.stack([predict.waveform_segment(clip, s * hop, pre) for s in starts])
    assert segments.shape == (3, pre.segment_samples)
    ours = np.asarray(frontend.front_end(pre)(segments))[..., 0]
    for got, s in zip(ours, starts):
        expected = whole[s : s + pre.window_frames]
        floor = max(float(got.max()), float(expected.max())) - pre.spectrogram.top_db
        np.testing.assert_allclose(np.maximum(got, floor), np.maximum(expected, floor), atol=1e-3)


@pytest.fixture(scope="module")
def waveform(tmp_path_factory):
    """(model dir, classifier, waveform model, float .tflite bytes) for an untrained tiny cnn."""
    import keras

    model_dir = make_model_dir(tmp_path_factory.mktemp("export") / "models")
    classifier = keras.saving.load_model(model_dir / "model.keras")
    pre = predict.read_preprocess(fileio.read_json(model_dir / "preprocess.json"), "preprocess.json")
    wave_model, _ = frontend.waveform_models(classifier, pre)
    saved = tmp_path_factory.mktemp("saved") / "saved_model"
    wave_model.export(str(saved), format="tf_saved_model", verbose=False)
    return model_dir, classifier, wave_model, export.to_tflite(saved), pre


def test_float_tflite_equals_the_keras_pipeline_on_the_same_windows(waveform):
    from audiocnn.spectrogram import log_mel

    _, classifier, wave_model, tflite_bytes, pre = waveform
    rng = np.random.default_rng(2)
    windows = (rng.normal(size=(3, pre.window_samples)) * np.array([[0.01], [0.1], [0.5]])).astype(np.float32)
    segments = np.stack([predict.waveform_segment(w, 0, pre) for w in windows])  # each window a clip of its own
    runner = TFLiteRunner(tflite_bytes)
    assert runner.input["shape"].tolist() == [1, pre.segment_samples] and runner.output["shape"].tolist() == [1, 3]
    tflite = runner(segments)
    keras_wave = wave_model.predict(segments, verbose=0)
    pipeline = classifier.predict(np.stack([log_mel(w, SAMPLE_RATE, pre.spectrogram) for w in windows])[..., None],
                                  verbose=0)
    np.testing.assert_allclose(tflite, keras_wave, atol=1e-5)
    np.testing.assert_allclose(tflite, pipeline, atol=1e-5)


def test_classifier_must_take_the_log_mel_window(waveform):
    import keras

    pre = waveform[4]
    other = keras.Sequential([keras.Input((10, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(DataError, match="export supports model.arch cnn"):
        frontend.waveform_models(other, pre)


def test_parity_figures_and_the_gate():
    reference = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([0, 1, 0, 0])
    floats = reference + np.array([[-0.001, 0.001], [0.002, -0.002], [0.0, 0.0], [0.0, 0.0]])
    int8 = np.array([[0.8, 0.2], [0.6, 0.4], [0.7, 0.3], [0.3, 0.7]])
    figures = export.parity(reference, floats, int8, y)
    assert figures["float"] == {"top1_agreement": 1.0, "mean_abs_diff": pytest.approx(0.00075),
                                "max_abs_diff": pytest.approx(0.002), "accuracy": 0.75}
    assert figures["int8"]["accuracy"] == 0.5 and figures["int8"]["accuracy_drop"] == 0.25
    params = export.ExportParams(int8=True, calibration_windows=8, min_top1_agreement=0.99, max_mean_abs_diff=1e-3,
                                 max_int8_accuracy_drop=0.3, seed=0)
    export.check_parity(figures, params)
    strict = export.ExportParams(True, 8, 0.99, 1e-4, 0.01, 0)
    with pytest.raises(DataError, match=r"on 4 test clips: float mean .* 7.50e-04 > export.max_mean_abs_diff "
                                        r"0.0001; int8 accuracy 0.5000 is 0.2500 below float 0.7500"):
        export.check_parity(figures, strict)


# --- end to end: a learnable set, a trained model, the stage -------------------------------------------


def learnable_set(root: Path, pre: predict.Preprocess, per_class: dict[str, int]) -> None:
    """Pipeline-shaped normalized clips, features and splits: a low tone, a high tone, noise."""
    from audiocnn.normalize import normalize_signal
    from audiocnn.spectrogram import log_mel

    rng = np.random.default_rng(5)
    rows: dict[str, list[dict]] = {}
    features: dict[str, np.ndarray] = {}
    clips: dict[str, np.ndarray] = {}
    for split, n in per_class.items():
        for label, freq in zip(LABELS, (300.0, 3000.0, 0.0)):
            for i in range(n):
                seconds = rng.uniform(0.6, 1.6)
                t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
                x = rng.normal(0, 0.05, t.size) + (np.sin(2 * np.pi * freq * rng.uniform(0.9, 1.1) * t) if freq else 0)
                mono = normalize_signal(x[:, None].astype(np.float32), SAMPLE_RATE, SAMPLE_RATE, pre.normalize)
                clip_id = f"{label}-{split}{i:02d}"
                clips[clip_id] = mono[:, np.newaxis]  # (samples, 1)
                features[clip_id] = log_mel(mono, SAMPLE_RATE, pre.spectrogram)
                rows.setdefault(split, []).append({"id": clip_id, "path": f"{clip_id}.wav", "label": label})
    packed.write(root / "normalize", clips, kind=packed.AUDIO)
    packed.write(root / "features", features)
    for split, frame in rows.items():
        fileio.write_csv(root / "split" / f"{split}.csv", pd.DataFrame(frame))


def train_tiny(model_dir: Path, root: Path, pre: predict.Preprocess) -> None:
    """Fit the model in ``model_dir`` on random windows of the training features, in place."""
    import keras

    from audiocnn import train

    model = keras.saving.load_model(model_dir / "model.keras")
    frame = data.read_split(root / "split", "train")
    rng = np.random.default_rng(0)
    x, y = [], []
    for clip_id, label in zip(frame["id"], frame["label"]):
        feats = data.pad_to(data.load_features(root / "features", clip_id), pre.window_frames, pre.spectrogram.top_db)
        for _ in range(3):
            start = int(rng.integers(0, feats.shape[0] - pre.window_frames + 1))
            x.append(feats[start : start + pre.window_frames])
            y.append(LABELS.index(label))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(np.stack(x)[..., None], keras.utils.to_categorical(y, 3), epochs=12, batch_size=16, verbose=0)
    train.write_model_dir(model_dir, model, LABELS, fileio.read_json(model_dir / "preprocess.json"))


@pytest.mark.slow
def test_export_end_to_end_then_predict_with_tflite(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "models")
    pre = predict.read_preprocess(fileio.read_json(model_dir / "preprocess.json"), "preprocess.json")
    learnable_set(tmp_path, pre, {"train": 12, "test": 8})
    train_tiny(model_dir, tmp_path, pre)
    out = tmp_path / "export"
    settings = export.ExportParams(int8=True, calibration_windows=48, min_top1_agreement=0.99,
                                   max_mean_abs_diff=1e-3, max_int8_accuracy_drop=0.01, seed=0)
    meta = export.run(model_dir=model_dir, normalized=tmp_path / "normalize", split=tmp_path / "split",
                      features=tmp_path / "features", out=out, params=settings, hop_seconds=0.25, batch_size=64,
                      metrics=tmp_path / "metrics" / "export.json")

    figures = meta["parity"]
    assert figures["clips"] == 24 and figures["reference_accuracy"] >= 0.9  # learnable: int8 has something to lose
    assert figures["float"]["top1_agreement"] >= 0.99 and figures["float"]["mean_abs_diff"] <= 1e-3
    assert figures["int8"]["accuracy_drop"] <= 0.01 and figures["frontend_max_abs_db"] < 1e-3
    assert fileio.read_json(out / "export.json") == meta and meta["labels"] == LABELS and meta["hop_seconds"] == 0.25
    for entry in meta["models"].values():
        if "file" in entry:
            assert (out / entry["file"]).stat().st_size == entry["bytes"]
    assert meta["models"]["int8"]["input"]["dtype"] == "int8" and meta["models"]["float"]["input"]["shape"] == [1, 8672]
    # 256 (n_fft // 2) before the 0.5 s window, then to the end of its 52nd frame: (52 - 1) * 160 + 512
    assert meta["context_samples"] == 256 and meta["segment_samples"] == pre.segment_samples == 8672
    assert (out / "saved_model" / "saved_model.pb").is_file()
    exported = fileio.read_json(tmp_path / "metrics" / "export.json")
    assert exported["float"] == figures["float"] and exported["bytes"]["int8"] == meta["models"]["int8"]["bytes"]

    wav = write_wav(tmp_path / "high.wav", 1.3, rate=22050, freq=3000.0, channels=1)
    keras_p = predict.predict_file(predict.load_model(model_dir), wav, 0.25)
    for name in ("model.tflite", "model_int8.tflite"):
        got = predict.predict_file(predict.load_model(out / name), wav, 0.25)
        assert got.probabilities.argmax() == keras_p.probabilities.argmax() == LABELS.index("engine")
        assert np.abs(got.probabilities - keras_p.probabilities).max() < (0.02 if "int8" in name else 0.005)
    assert cli.main(["predict", str(wav), "--model", str(out / "model_int8.tflite"), "--format", "json"]) == 0
    assert '"label": "engine"' in capsys.readouterr().out

    # the stage script fails on parity it cannot meet, naming the figures, and writes nothing
    params = real_params()
    params["export"].update(max_mean_abs_diff=0.0, min_top1_agreement=1.0, calibration_windows=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    main = runpy.run_path(str(REPO / "stages" / "export.py"))["main"]
    with pytest.raises(DataError, match=r"export parity not met on 24 test clips: float mean .* > "
                                        r"export.max_mean_abs_diff 0.0"):
        main(["--params", str(tmp_path / "params.yaml"), "--model", str(model_dir), "--normalized",
              str(tmp_path / "normalize"), "--features", str(tmp_path / "features"), "--split",
              str(tmp_path / "split"), "--out", str(tmp_path / "failed"), "--metrics", str(tmp_path / "failed.json")])
    assert not (tmp_path / "failed").exists() and not (tmp_path / "failed.json").exists()


def test_a_split_clip_missing_from_the_normalized_clips_is_named(tmp_path):
    model_dir = make_model_dir(tmp_path / "models")
    pre = predict.read_preprocess(fileio.read_json(model_dir / "preprocess.json"), "preprocess.json")
    learnable_set(tmp_path, pre, {"train": 1, "test": 1})
    index = fileio.read_csv(tmp_path / "normalize" / "index.csv")
    gone = data.read_split(tmp_path / "split", "test")["id"].iloc[0]
    fileio.write_csv(tmp_path / "normalize" / "index.csv", index[index["id"] != gone])
    settings = export.ExportParams(int8=False, calibration_windows=8, min_top1_agreement=0.99,
                                   max_mean_abs_diff=1e-3, max_int8_accuracy_drop=0.01, seed=0)
    with pytest.raises(DataError, match=rf"1 clip\(s\) of .*split not in .*normalize/index\.csv, first: {gone}"):
        export.run(model_dir=model_dir, normalized=tmp_path / "normalize", split=tmp_path / "split",
                   features=tmp_path / "features", out=tmp_path / "export", params=settings, hop_seconds=0.25,
                   batch_size=64)
    assert not (tmp_path / "export").exists()


def tflite_against_keras(classifier, pre, rng, tmp_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two random 1-window clips through ``classifier``'s float TFLite waveform model and through the Keras pipeline.

    Returns (TFLite probabilities, Keras probabilities, the log-mel windows (2, frames, n_mels, 1) Keras saw).
    """
    from audiocnn.spectrogram import log_mel

    wave_model, _ = frontend.waveform_models(classifier, pre)
    wave_model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    runner = TFLiteRunner(export.to_tflite(tmp_path / "saved"))
    windows = (rng.normal(size=(2, pre.window_samples)) * 0.1).astype(np.float32)
    segments = np.stack([predict.waveform_segment(w, 0, pre) for w in windows])
    logmel = np.stack([log_mel(w, SAMPLE_RATE, pre.spectrogram) for w in windows])[..., None]
    return runner(segments), classifier.predict(logmel, verbose=0), logmel


def test_an_ensemble_exports_like_one_network(tmp_path):
    """model.members > 1 saves one Keras model (nested networks, Average): the float TFLite matches it."""
    from audiocnn import models

    pre = preprocess()
    rng = np.random.default_rng(4)
    norm = rng.normal(-40.0, 12.0, (4, pre.window_frames, pre.spectrogram.n_mels)).astype(np.float32)
    params = models.ModelParams("cnn", 8, 0.1, True, 0, 2)
    shape = (pre.window_frames, pre.spectrogram.n_mels, 1)
    classifier = models.ensemble([models.build(params, 3, shape, norm, name=models.member_name(k)) for k in range(2)],
                                 "cnn_ensemble")
    tflite, pipeline, _ = tflite_against_keras(classifier, pre, rng, tmp_path)
    np.testing.assert_allclose(tflite, pipeline, atol=1e-5)


@pytest.mark.parametrize("stretched, shifted", [(False, False), (True, False), (True, True)])
def test_a_warp_average_exports_like_one_network(tmp_path, stretched, shifted):
    """model.test_warps saves a Keras model of stock layers (fixed Dense warps, a floor fill, Average): TFLite matches it."""
    from audiocnn import models

    pre = preprocess()
    rng = np.random.default_rng(5)
    norm = rng.normal(-40.0, 12.0, (4, pre.window_frames, pre.spectrogram.n_mels)).astype(np.float32)
    shape = (pre.window_frames, pre.spectrogram.n_mels, 1)
    network = models.build(models.ModelParams("cnn", 8, 0.1, True, 0, 1), 3, shape, norm)
    classifier = models.warp_average(network, (0.9, 1.0, 1.1), "cnn_warped")
    if stretched:  # model.test_stretches around the warps: fixed Dense on the time axis, Permute, a frame fill
        classifier = models.stretch_average(classifier, (0.9, 1.0, 1.1), "cnn_stretched")
    if shifted:  # model.test_shifts around the stretches: the same layers with a shift matrix
        classifier = models.shift_average(classifier, (0, 4, 8), "cnn_shifted")
    tflite, pipeline, logmel = tflite_against_keras(classifier, pre, rng, tmp_path)
    np.testing.assert_allclose(tflite, pipeline, atol=1e-5)
    assert not np.allclose(pipeline, network.predict(logmel, verbose=0), atol=1e-5)
