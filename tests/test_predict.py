"""predict, timeline, stream: windows and events, preprocessing equal to the pipeline's, streaming.

A tiny untrained cnn saved by the train module's own ``write_model_dir`` serves as the model:
parity with the pipeline needs the same arithmetic, not accuracy.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiocnn import data, fileio, packed, predict, spectrogram, stream, timeline
from audiocnn.audio import AudioReadError
from audiocnn.config import ParamsError, load_section, to_dict
from audiocnn.errors import DataError
from conftest import real_params

LABELS = ["chainsaw", "engine", "storm"]
WINDOW_SECONDS = 0.5
SAMPLE_RATE = 16000


def model_params() -> dict:
    """The real audio/normalize/spectrogram params with a 0.5 s window."""
    params = real_params()
    params["train"]["window_seconds"] = WINDOW_SECONDS
    return params


def make_model_dir(model_dir: Path, seed: int = 0) -> Path:
    """models/ as train writes it (model.keras, labels.json, preprocess.json, run.json), untrained weights."""
    import keras

    from audiocnn import models, train
    from audiocnn.audio import AudioParams
    from audiocnn.normalize import NormalizeParams
    from audiocnn.spectrogram import SpectrogramParams

    params = model_params()
    audio = load_section(params, "audio", AudioParams)
    spec = load_section(params, "spectrogram", SpectrogramParams)
    frames = data.window_frames(WINDOW_SECONDS, audio.sample_rate, spec.hop_length, spec.n_fft)
    keras.utils.set_random_seed(seed)
    norm = np.random.default_rng(seed).normal(-40.0, 12.0, (4, frames, spec.n_mels)).astype(np.float32)
    model = models.build_cnn(len(LABELS), (frames, spec.n_mels, 1), 8, 0.1, norm)
    preprocess = {"audio": to_dict(audio), "normalize": to_dict(load_section(params, "normalize", NormalizeParams)),
                  "spectrogram": to_dict(spec), "window_seconds": WINDOW_SECONDS, "window_frames": frames,
                  "arch": "cnn"}
    train.write_model_dir(model_dir, model, LABELS, preprocess)
    return model_dir


def tone_clip(seconds: float, rate: int, freq: float, seed: int = 0, channels: int = 1) -> np.ndarray:
    """(frames, channels) float32: a tone that fades in, over noise different in every channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * np.minimum(1.0, t / max(seconds / 2, 1e-3))  # (frames,)
    noise = rng.normal(0, 0.02, (t.size, channels)) * np.linspace(1.0, 8.0, channels)  # (frames, channels)
    return (x[:, None] + noise).astype(np.float32)


def write_wav(path: Path, seconds: float, rate: int = 22050, freq: float = 440.0, channels: int = 2,
              seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone_clip(seconds, rate, freq, seed, channels), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("predict") / "models")


@pytest.fixture(scope="module")
def model(model_dir) -> predict.Model:
    return predict.load_model(model_dir)


# --- pure: windows, timeline, events -------------------------------------------------------------


@pytest.mark.parametrize(("frames", "window", "hop"), [(101, 101, 50), (300, 101, 50), (40, 101, 50), (250, 51, 25),
                                                       (250, 51, 60), (51, 51, 1)])
def test_window_starts_are_the_windows_sliding_windows_cuts(frames, window, hop):
    x = np.arange(frames * 3, dtype=np.float32).reshape(frames, 3)
    windows = data.sliding_windows(x, window, hop, 80.0)
    starts = timeline.window_starts(frames, window, hop)
    padded = data.pad_to(x, window, 80.0)
    assert len(starts) == len(windows)
    for start, w in zip(starts, windows):
        np.testing.assert_array_equal(w, padded[start : start + window])


def test_hop_frames_is_evaluates():
    from audiocnn import evaluate

    for hop_s in (0.001, 0.01, 0.25, 0.333, 0.5, 1.0, 2.7):
        for rate, hop_length in ((16000, 160), (8000, 128), (22050, 512)):
            assert timeline.hop_frames(hop_s, rate, hop_length) == evaluate.hop_frames(hop_s, rate, hop_length)


def test_top_k_orders_by_probability():
    assert timeline.top_k(np.array([0.2, 0.5, 0.3]), LABELS, 2) == [("engine", 0.5), ("storm", 0.3)]
    assert [label for label, _ in timeline.top_k(np.array([0.5, 0.5, 0.0]), LABELS, 5)] == LABELS[:2] + ["storm"]


SEQ = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.45, 0.1, 0.45],
                [0.7, 0.2, 0.1]])
STARTS = np.arange(6) * 0.5
ENDS = STARTS + 1.0


def test_windows_merge_into_events_of_the_same_label():
    windows = timeline.label_windows(SEQ, STARTS, ENDS, LABELS)
    assert [w.label for w in windows] == ["chainsaw", "chainsaw", "engine", "engine", "chainsaw", "chainsaw"]
    events = timeline.merge_events(windows)
    assert [(e.label, e.start_s, e.end_s, e.windows) for e in events] == [
        ("chainsaw", 0.0, 1.5, 2), ("engine", 1.0, 2.5, 2), ("chainsaw", 2.0, 3.5, 2)]
    assert events[0].probability == pytest.approx(0.85) and events[0].peak == pytest.approx(0.9)
    assert events[2].probability == pytest.approx(0.575)


def test_threshold_drops_windows_and_splits_events():
    windows = timeline.label_windows(SEQ, STARTS, ENDS, LABELS, threshold=0.6)
    assert [w.index for w in windows] == [0, 1, 2, 3, 5]
    events = timeline.merge_events(windows)
    assert [(e.label, e.start_s, e.end_s) for e in events] == [("chainsaw", 0.0, 1.5), ("engine", 1.0, 2.5),
                                                              ("chainsaw", 2.5, 3.5)]  # index 4 dropped: a gap


def test_target_reports_where_its_probability_reaches_the_threshold():
    windows = timeline.label_windows(SEQ, STARTS, ENDS, LABELS, threshold=0.3, target="storm")
    assert [(w.index, w.label, w.probability) for w in windows] == [(3, "storm", 0.3), (4, "storm", 0.45)]
    assert [(e.start_s, e.end_s, e.windows) for e in timeline.merge_events(windows)] == [(1.5, 3.0, 2)]
    assert [w.index for w in timeline.label_windows(SEQ, STARTS, ENDS, LABELS, target="engine")] == [2, 3]  # 0.5
    with pytest.raises(ValueError, match="'rain' is not a model label"):
        timeline.label_windows(SEQ, STARTS, ENDS, LABELS, target="rain")
    assert timeline.merge_events([]) == []


# --- the model and the pipeline --------------------------------------------------------------------


def pipeline_probabilities(wav: Path, model_dir: Path, tmp: Path, hop_seconds: float) -> np.ndarray:
    """The pipeline's own path for one clip: normalized_audio, features_of, model_input, clip_probabilities."""
    from audiocnn import evaluate, models, normalize, spectrogram
    from audiocnn.spectrogram import SpectrogramParams

    params = model_params()
    params["spectrogram"]["images"] = False
    spec = load_section(params, "spectrogram", SpectrogramParams)
    record = {"id": "clip-1", "path": wav.name, "label": "engine"}
    mono = normalize.normalized_audio(record, wav.parent, SAMPLE_RATE,
                                      load_section(params, "normalize", normalize.NormalizeParams), max_seconds=600.0)
    db, _ = spectrogram.features_of(mono, SAMPLE_RATE, spec)
    packed.write(tmp / "features", {record["id"]: db})
    keras_model, labels = evaluate.load_model(model_dir)
    assert labels == LABELS
    frames = data.window_frames(WINDOW_SECONDS, SAMPLE_RATE, spec.hop_length, spec.n_fft)
    x = models.model_input("cnn", record | {"image": ""}, features_dir=tmp / "features", images_dir=tmp / "images",
                           window_frames=frames, hop_frames=evaluate.hop_frames(hop_seconds, SAMPLE_RATE, 160),
                           top_db=spec.top_db)
    return evaluate.clip_probabilities([x], lambda b: keras_model.predict(b, batch_size=64, verbose=0), chunk=1024)[0]


@pytest.mark.parametrize(("seconds", "hop_seconds"), [(2.37, 0.25), (0.31, 0.25), (1.0, 0.5)])
def test_prediction_equals_the_pipeline_for_the_same_clip(tmp_path, model_dir, model, seconds, hop_seconds):
    wav = write_wav(tmp_path / "in" / "clip.wav", seconds, rate=22050, channels=2)
    expected = pipeline_probabilities(wav, model_dir, tmp_path, hop_seconds)
    got = predict.predict_file(model, wav, hop_seconds)
    np.testing.assert_allclose(got.probabilities, expected, atol=1e-5, rtol=0)
    frames = spectrogram.expected_frames(round(got.duration_s * SAMPLE_RATE), model.pre.spectrogram)
    windows = timeline.window_starts(frames, model.pre.window_frames, timeline.hop_frames(hop_seconds, SAMPLE_RATE, 160))
    assert len(got.window_probabilities) == len(got.starts_s) == len(windows)
    assert got.starts_s[0] == 0.0 and got.ends_s[-1] == pytest.approx(seconds, abs=0.01)
    assert np.all(got.ends_s - got.starts_s <= WINDOW_SECONDS + 1e-9)


def test_missing_and_incomplete_models_are_named(tmp_path):
    with pytest.raises(predict.ModelError, match=f"model not found: {tmp_path / 'nope'}"):
        predict.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.ModelError, match="model.keras, .*labels.json, .*preprocess.json missing"):
        predict.load_model(tmp_path / "empty")
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(predict.ModelError, match="export.json not found"):
        predict.load_model(tmp_path / "m.tflite")
    meta = {"labels": ["a"], "models": {"float": {"file": "m.tflite", "role": "waveform"}}}
    fileio.write_json(tmp_path / "export.json", meta)
    with pytest.raises(predict.ModelError, match="export.json: incomplete, no 'preprocess'"):
        predict.load_model(tmp_path / "m.tflite")
    params = model_params()
    preprocess = {key: params[key] for key in ("audio", "normalize", "spectrogram")}
    fileio.write_json(tmp_path / "export.json", meta | {"preprocess": preprocess | {"window_seconds": 0.5,
                                                                                   "window_frames": 51}})
    with pytest.raises(predict.ModelError, match=f"cannot load model {tmp_path / 'm.tflite'}: "):
        predict.load_model(tmp_path / "m.tflite")


def test_unreadable_empty_and_nan_files_name_the_file(tmp_path, model):
    text = tmp_path / "notes.wav"
    text.write_text("not audio", encoding="utf-8")
    with pytest.raises(AudioReadError, match="notes.wav"):
        predict.predict_file(model, text, 0.25)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(DataError, match="empty.wav: no samples"):
        predict.predict_file(model, empty, 0.25)
    bad = tmp_path / "nan.wav"
    sf.write(bad, np.full((800, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match="nan.wav: 800 NaN/Inf"):
        predict.predict_file(model, bad, 0.25)


def test_folders_are_searched_recursively_for_audio(tmp_path):
    for name in ("a/x.wav", "a/b/y.FLAC", "z.ogg", "a/readme.txt", "m.mp3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in predict.find_audio(tmp_path)] == [
        "a/b/y.FLAC", "a/x.wav", "m.mp3", "z.ogg"]
    assert predict.find_audio(tmp_path / "a" / "readme.txt") == [tmp_path / "a" / "readme.txt"]  # a file as given
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="void: no wav/flac/ogg/mp3 files"):
        predict.find_audio(tmp_path / "void")


def test_hop_defaults_and_the_fixed_window(tmp_path, model):
    assert predict.default_hop_seconds(model, tmp_path / "absent.yaml") == WINDOW_SECONDS / 2
    (tmp_path / "params.yaml").write_text("evaluate:\n  hop_seconds: 0.2\n", encoding="utf-8")
    assert predict.default_hop_seconds(model, tmp_path / "params.yaml") == 0.2
    predict.window_seconds_check(model, None)
    predict.window_seconds_check(model, WINDOW_SECONDS)
    with pytest.raises(ParamsError, match="--window 1: .* takes fixed 0.5 s windows"):
        predict.window_seconds_check(model, 1.0)


# --- streaming ------------------------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A pipe that hands out at most ``size`` bytes per read."""

    def __init__(self, payload: bytes, size: int) -> None:
        self.payload, self.size, self.pos = payload, size, 0

    def read1(self, n: int = -1) -> bytes:
        chunk = self.payload[self.pos : self.pos + min(self.size, n)]
        self.pos += len(chunk)
        return chunk


def pcm(seconds: float, rate: int = SAMPLE_RATE, channels: int = 1) -> tuple[np.ndarray, bytes]:
    x = np.round(tone_clip(seconds, rate, 300.0, seed=3, channels=channels) * 32767).astype("<i2")
    return x, x.tobytes()


def test_stream_windows_are_clips_of_their_own(tmp_path, model):
    samples, payload = pcm(1.23)
    windows = list(stream.stream_windows(model, io.BytesIO(payload), SAMPLE_RATE, 1, hop_seconds=0.25))
    assert [(w.index, w.start_s, w.end_s) for w in windows] == [
        (0, 0.0, 0.5), (1, 0.25, 0.75), (2, 0.5, 1.0), (3, 0.73, 1.23)]  # the last aligned to the end
    for w in (windows[1], windows[3]):  # each window predicted as a clip holding just that audio
        start = int(round(w.start_s * SAMPLE_RATE))
        clip = tmp_path / f"w{w.index}.wav"
        sf.write(clip, samples[start : start + SAMPLE_RATE // 2], SAMPLE_RATE, subtype="PCM_16")
        expected = predict.predict_file(model, clip, 0.25)
        assert len(expected.starts_s) == 1
        np.testing.assert_allclose(w.probabilities, expected.probabilities, atol=1e-5, rtol=0)
    trickled = list(stream.stream_windows(model, Trickle(payload, 3), SAMPLE_RATE, 1, hop_seconds=0.25))
    np.testing.assert_allclose([w.probabilities for w in trickled], [w.probabilities for w in windows], atol=1e-6)


def test_stream_long_hops_short_streams_and_channels(model):
    _, payload = pcm(2.0, rate=8000, channels=2)
    windows = list(stream.stream_windows(model, io.BytesIO(payload), 8000, 2, hop_seconds=0.8))
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 0.5), (0.8, 1.3), (1.5, 2.0)]
    _, short = pcm(0.2)
    (one,) = stream.stream_windows(model, io.BytesIO(short + b"\x01"), SAMPLE_RATE, 1, hop_seconds=0.25)
    assert (one.start_s, one.end_s) == (0.0, 0.2) and math.isclose(one.probabilities.sum(), 1.0, rel_tol=1e-5)
    assert list(stream.stream_windows(model, io.BytesIO(b""), SAMPLE_RATE, 1, hop_seconds=0.25)) == []


def test_seed_model_predicts_the_clip_image_the_pipeline_renders(tmp_path):
    """model.arch seed: one image of the whole clip, the PNG spectrogram_clip writes, read as data.load_image does."""
    import keras

    from audiocnn import evaluate, models, normalize, spectrogram, train
    from audiocnn.spectrogram import SpectrogramParams

    params = model_params()
    params["spectrogram"].update(images=True, image_size=48)
    spec = load_section(params, "spectrogram", SpectrogramParams)
    norm = load_section(params, "normalize", normalize.NormalizeParams)
    keras.utils.set_random_seed(1)
    preprocess = {"audio": params["audio"], "normalize": to_dict(norm), "spectrogram": to_dict(spec),
                  "window_seconds": WINDOW_SECONDS, "window_frames": 51, "arch": "seed"}
    train.write_model_dir(tmp_path / "models", models.build_seed(3, (48, 48, 3)), LABELS, preprocess)
    wav = write_wav(tmp_path / "in" / "clip.wav", 1.7)
    record = {"id": "clip-1", "path": "clip.wav", "label": "storm"}
    mono = normalize.normalized_audio(record, wav.parent, SAMPLE_RATE, norm, max_seconds=600.0)
    _, png = spectrogram.features_of(mono, SAMPLE_RATE, spec)  # the image the stage writes for this clip
    image = "storm/clip-1.png"
    (tmp_path / "images" / "storm").mkdir(parents=True)
    (tmp_path / "images" / image).write_bytes(png)
    keras_model, _ = evaluate.load_model(tmp_path / "models")
    x = models.model_input("seed", record | {"image": image}, features_dir=tmp_path / "features",
                           images_dir=tmp_path / "images", window_frames=51, hop_frames=25, top_db=spec.top_db)
    expected = evaluate.clip_probabilities([x], lambda b: keras_model.predict(b, verbose=0), chunk=64)[0]
    got = predict.predict_file(predict.load_model(tmp_path / "models"), wav, 0.25)
    np.testing.assert_allclose(got.probabilities, expected, atol=1e-5, rtol=0)
    assert (got.starts_s.tolist(), got.ends_s.tolist()) == ([0.0], [pytest.approx(1.7, abs=1e-3)])
