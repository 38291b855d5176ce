"""Predict with a trained model: a Keras model dir (models/) or an exported .tflite, on files or a live stream.

A file goes through the pipeline's own code with the params the model was trained with
(``preprocess.json``): ``normalize.normalized_audio`` (decode, downmix, resample, DC removal,
loudness normalization over the whole recording), then for Keras ``spectrogram.log_mel`` and ``data.sliding_windows`` (the model's
window, a start every hop, one aligned to the end), and the file's probabilities are the
float64 mean over windows: what evaluate computes for a test clip. An exported .tflite
(``audiocnn.tflite``) reads waveform windows cut at the same starts, with the neighbouring samples
their STFT frames overlap (``Preprocess.segment_samples``), and computes the log-mel inside the
model. TensorFlow is imported only when a Keras model is loaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from audiocnn import config, fileio, timeline
from audiocnn.audio import AudioParams
from audiocnn.config import ParamsError
from audiocnn.errors import DataError
from audiocnn.melspec import expected_frames
from audiocnn.normalize import NormalizeParams, normalized_audio

if TYPE_CHECKING:  # spectrogram imports librosa: loaded only when a model needs it
    from audiocnn.spectrogram import SpectrogramParams

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")
BATCH_WINDOWS = 64  # windows per Keras call (evaluate.batch_size)


class ModelError(DataError):
    """The model path is missing or incomplete (a usage error: the CLI exits 2)."""


@dataclass(frozen=True)
class Preprocess:
    """How a recording becomes model input: the training params stored in models/preprocess.json."""

    audio: AudioParams
    normalize: NormalizeParams
    spectrogram: SpectrogramParams
    window_seconds: float
    window_frames: int
    arch: str

    @property
    def sample_rate(self) -> int:
        return self.audio.sample_rate

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.audio.sample_rate))

    @property
    def context_samples(self) -> int:
        """Samples before a waveform window in an exported model's input: half an STFT frame (n_fft // 2)."""
        return self.spectrogram.n_fft // 2

    @property
    def segment_samples(self) -> int:
        """An exported model's waveform input: every sample under the window's frames.

        From ``context_samples`` before the window to the end of its last frame, which overlaps
        the window's end: the frames see the audio around the window, as the frames of the
        clip's log-mel that evaluate slices do, instead of zero padding.
        """
        return (self.window_frames - 1) * self.spectrogram.hop_length + self.spectrogram.n_fft


def read_preprocess(raw: Mapping[str, Any], where: str | Path) -> Preprocess:
    """Validate a preprocess.json mapping with the pipeline's own params classes."""
    from audiocnn.spectrogram import SpectrogramParams

    spectrogram = raw.get("spectrogram")
    if isinstance(spectrogram, Mapping) and "preemphasis" not in spectrogram:
        raw = {**raw, "spectrogram": {**spectrogram, "preemphasis": 0.0}}  # saved before the key existed: none applied
    try:
        return Preprocess(config.load_section(raw, "audio", AudioParams),
                          config.load_section(raw, "normalize", NormalizeParams),
                          config.load_section(raw, "spectrogram", SpectrogramParams),
                          float(raw["window_seconds"]), int(raw["window_frames"]), str(raw.get("arch", "cnn")))
    except (ParamsError, KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{where}: not a valid preprocess spec: {err}") from None


@dataclass(frozen=True)
class Prediction:
    """A recording's result: the mean probabilities and every window's."""

    probabilities: np.ndarray  # (classes,) float64, mean over windows
    window_probabilities: np.ndarray  # (windows, classes) float64
    starts_s: np.ndarray  # (windows,) seconds
    ends_s: np.ndarray  # (windows,) seconds
    duration_s: float


class Model:
    """A loaded model: its labels, its preprocessing, and how a normalized waveform becomes inputs."""

    path: Path
    labels: list[str]
    pre: Preprocess
    hop_seconds: float | None = None  # stored with the model (export.json), else None

    def clip_inputs(self, mono: np.ndarray, hop_frames: int) -> tuple[np.ndarray, list[int]]:
        """(samples,) normalized -> (windows, ...) model inputs and their start frames."""
        raise NotImplementedError

    def window_input(self, mono: np.ndarray) -> np.ndarray:
        """One normalized window (stream mode) -> (1, ...) model input of the model's fixed size."""
        raise NotImplementedError

    def run(self, x: np.ndarray) -> np.ndarray:
        """(windows, ...) inputs -> (windows, classes) probabilities."""
        raise NotImplementedError


class KerasModel(Model):
    """models/: model.keras (safe_mode), labels.json, preprocess.json; log-mel (cnn) or image (seed) input."""

    def __init__(self, model_dir: Path) -> None:
        self.path = model_dir
        files = [model_dir / name for name in ("model.keras", "labels.json", "preprocess.json")]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ModelError(f"model not found: {', '.join(missing)} missing (train a model, or pass --model)")
        self.labels = list(fileio.read_json(files[1])["labels"])
        self.pre = read_preprocess(fileio.read_json(files[2]), files[2])
        meta = model_dir / "export.json"
        self.hop_seconds = fileio.read_json(meta).get("hop_seconds") if meta.is_file() else None
        import keras  # TensorFlow starts here, only for Keras models

        self.model = keras.saving.load_model(files[0], safe_mode=True)
        if self.model.output_shape[-1] != len(self.labels):
            raise ModelError(f"{files[0]} has {self.model.output_shape[-1]} outputs but {files[1]} lists "
                             f"{len(self.labels)} labels")

    def _log_mel(self, mono: np.ndarray) -> np.ndarray:
        from audiocnn import spectrogram

        return spectrogram.log_mel(mono, self.pre.sample_rate, self.pre.spectrogram)  # (frames, n_mels) dB

    def _image(self, db: np.ndarray) -> np.ndarray:
        from audiocnn import images

        rgb = images.render(db, self.pre.spectrogram.top_db, self.pre.spectrogram.image_size)
        return (rgb.astype(np.float32) / 255.0)[np.newaxis]  # (1, size, size, 3), as data.load_image reads the PNG

    def clip_inputs(self, mono: np.ndarray, hop_frames: int) -> tuple[np.ndarray, list[int]]:
        from audiocnn import data

        db = self._log_mel(mono)
        if self.pre.arch == "seed":
            return self._image(db), [0]
        starts = timeline.window_starts(len(db), self.pre.window_frames, hop_frames)
        return data.sliding_windows(db, self.pre.window_frames, hop_frames, self.pre.spectrogram.top_db)[..., np.newaxis], starts

    def window_input(self, mono: np.ndarray) -> np.ndarray:
        from audiocnn import data

        db = self._log_mel(mono)
        if self.pre.arch == "seed":
            return self._image(db)
        x = data.pad_to(db, self.pre.window_frames, self.pre.spectrogram.top_db)[: self.pre.window_frames]
        return x[np.newaxis, ..., np.newaxis]  # the window's frames from its start, as the .tflite computes them

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self.model.predict_on_batch(x[i : i + BATCH_WINDOWS]))
                               for i in range(0, len(x), BATCH_WINDOWS)])


def waveform_segment(mono: np.ndarray, start: int, pre: Preprocess) -> np.ndarray:
    """(segment_samples,) float32: ``mono[start - context_samples :][:segment_samples]``, zeros outside the clip.

    The zeros are what the clip's centred STFT pads with, so the front end's frames of a
    segment are the clip's frames (``Preprocess.context_samples``).
    """
    lo = start - pre.context_samples
    segment = np.zeros(pre.segment_samples, np.float32)
    a, b = max(lo, 0), min(lo + pre.segment_samples, len(mono))
    if b > a:
        segment[a - lo : b - lo] = mono[a:b]
    return segment


def waveform_windows(mono: np.ndarray, pre: Preprocess, hop_frames: int) -> tuple[np.ndarray, list[int]]:
    """(samples,) normalized -> (windows, segment_samples) float32 and their start frames.

    The starts are those of evaluate's feature windows (``timeline.window_starts`` over the
    clip's ``melspec.expected_frames``): window k begins at sample start * hop_length and comes
    with its context, so the front end computes the clip's frames start..start+window_frames-1,
    and past a short clip's end the silence that evaluate pads with. What remains different is
    the top_db floor inside a long clip (the window's max instead of the clip's).
    """
    hop_length = pre.spectrogram.hop_length
    starts = timeline.window_starts(expected_frames(len(mono), pre.spectrogram), pre.window_frames, hop_frames)
    return np.stack([waveform_segment(mono, s * hop_length, pre) for s in starts]), starts


def load_model(path: str | Path) -> Model:
    """A model dir (model.keras, labels.json, preprocess.json) or a .tflite file; ModelError when absent."""
    path = Path(path)
    if path.suffix != ".tflite" and not path.is_dir():
        raise ModelError(f"model not found: {path} (expected a model directory or a .tflite file)")
    try:
        if path.suffix == ".tflite":
            from audiocnn.tflite import TFLiteModel

            return TFLiteModel(path)
        return KerasModel(path)
    except (OSError, ValueError) as err:  # a damaged model.keras or .tflite, unreadable metadata
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"cannot load model {path}: {err}") from None


def default_hop_seconds(model: Model, params_path: Path | None) -> float:
    """The model's stored hop, else ``evaluate.hop_seconds`` from ``params_path`` when it exists, else window/2."""
    if model.hop_seconds is not None:
        return float(model.hop_seconds)
    if params_path is not None and params_path.is_file():
        value = config.read_params(params_path).get("evaluate", {}).get("hop_seconds")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            log.debug("hop %.3f s from %s evaluate.hop_seconds", value, params_path)
            return float(value)
    return model.pre.window_seconds / 2


def predict_waveform(model: Model, mono: np.ndarray, hop_seconds: float) -> Prediction:
    """A normalized (samples,) recording at the model's rate -> windows and their mean (evaluate's rule)."""
    pre = model.pre
    hop = timeline.hop_frames(hop_seconds, pre.sample_rate, pre.spectrogram.hop_length)
    x, starts = model.clip_inputs(mono, hop)
    probs = np.asarray(model.run(x), dtype=np.float64)  # (windows, classes)
    duration_s = len(mono) / pre.sample_rate
    starts_s = np.asarray(starts, dtype=np.float64) * pre.spectrogram.hop_length / pre.sample_rate
    window_s = duration_s if pre.arch == "seed" else pre.window_seconds
    ends_s = np.minimum(starts_s + window_s, duration_s)
    return Prediction(probs.mean(axis=0), probs, starts_s, ends_s, duration_s)


def load_waveform(path: str | Path, pre: Preprocess) -> np.ndarray:
    """``path`` decoded and normalized by the normalize stage's own function: (samples,) float32 mono.

    The whole file is read (the pipeline stops at ingest.max_duration, 600 s by default).
    """
    return normalized_audio({"path": str(path)}, Path(), pre.sample_rate, pre.normalize, math.inf)


def predict_file(model: Model, path: str | Path, hop_seconds: float) -> Prediction:
    """One audio file -> its Prediction; AudioReadError/DataError naming the file when it cannot be read."""
    return predict_waveform(model, load_waveform(path, model.pre), hop_seconds)


def find_audio(path: Path) -> list[Path]:
    """A file as given, or every wav/flac/ogg/mp3 under a folder (recursive, sorted); DataError when none."""
    if not path.is_dir():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS)
    if not found:
        raise DataError(f"{path}: no {'/'.join(AUDIO_EXTENSIONS)} files in this folder")
    return found


def window_seconds_check(model: Model, window_seconds: float | None) -> None:
    """ParamsError unless ``window_seconds`` (--window) is the model's fixed input length."""
    if window_seconds is not None and not math.isclose(window_seconds, model.pre.window_seconds, abs_tol=1e-6):
        raise ParamsError(f"--window {window_seconds:g}: {model.path} takes fixed {model.pre.window_seconds:g} s "
                          "windows (train.window_seconds); retrain for another window")
