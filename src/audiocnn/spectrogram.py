"""Stage spectrogram: normalized clips -> log-mel features (what the model reads), PNGs and a gallery.

Per clip (a pure function of the index record and the settings, run in parallel):
power STFT (centred), mel filterbank (built once per process), ``power_to_db`` with
ref 1.0 floored at clip max - top_db, saved as float32 (frames, n_mels).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import librosa
import numpy as np

from audiocnn import fileio, images, parallel
from audiocnn.audio import AudioParams
from audiocnn.config import ParamsError, check
from audiocnn.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpectrogramParams:
    """``spectrogram``: the log-mel front end, the per-clip images and the gallery."""

    n_fft: int  # samples per FFT window
    hop_length: int  # samples between frames
    n_mels: int  # mel bands
    fmin: float  # Hz, lowest mel band edge
    fmax: float  # Hz, highest mel band edge (<= audio.sample_rate / 2)
    top_db: float  # dB of dynamic range kept below each clip's maximum
    workers: int  # processes; 0 = all cores
    images: bool  # also write one PNG per clip
    image_size: int  # pixels, square
    gallery_per_class: int  # clips per class in reports/gallery.png

    def __post_init__(self) -> None:
        check(self.n_fft >= 2, "n_fft", self.n_fft, "must be >= 2")
        check(0 < self.hop_length <= self.n_fft, "hop_length", self.hop_length, f"must be in 1..n_fft={self.n_fft}")
        check(self.n_mels > 0, "n_mels", self.n_mels, "must be > 0")
        check(self.n_mels <= self.n_fft // 2 + 1, "n_mels", self.n_mels, f"exceeds n_fft/2+1={self.n_fft // 2 + 1}")
        check(self.fmin >= 0, "fmin", self.fmin, "must be >= 0 Hz")
        check(self.fmax > self.fmin, "fmax", self.fmax, f"must be above fmin={self.fmin}")
        check(self.top_db > 0, "top_db", self.top_db, "must be > 0 dB")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0 = all cores)")
        check(self.image_size > 0, "image_size", self.image_size, "must be > 0 pixels")
        check(self.gallery_per_class > 0, "gallery_per_class", self.gallery_per_class, "must be > 0")


def check_against_audio(params: SpectrogramParams, audio: AudioParams) -> None:
    """Cross-section check: the mel range must fit below the Nyquist frequency."""
    nyquist = audio.sample_rate / 2
    if params.fmax > nyquist:
        raise ParamsError(f"spectrogram.fmax={params.fmax:g} exceeds audio.sample_rate/2={nyquist:g} "
                          f"(audio.sample_rate={audio.sample_rate})")


@functools.lru_cache(maxsize=4)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft//2+1) float32 mel filterbank, built once per process."""
    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float32)


def log_mel(mono: np.ndarray, sample_rate: int, params: SpectrogramParams) -> np.ndarray:
    """(samples,) float32 -> (frames, n_mels) float32 log-mel power, dB re 1.0, floored at max - top_db."""
    stft = librosa.stft(mono, n_fft=params.n_fft, hop_length=params.hop_length, center=True)  # (bins, frames)
    power = np.abs(stft) ** 2
    mel = mel_basis(sample_rate, params.n_fft, params.n_mels, params.fmin, params.fmax) @ power  # (n_mels, frames)
    db = librosa.power_to_db(mel, ref=1.0, top_db=params.top_db)
    return np.ascontiguousarray(db.T, dtype=np.float32)  # (frames, n_mels)


def spectrogram_clip(record: Mapping[str, str], clips_dir: Path, features_dir: Path, images_dir: Path,
                     sample_rate: int, params: SpectrogramParams) -> tuple[int, str]:
    """Features (and image) of one normalized clip; return (frames, image path relative to images_dir)."""
    mono = fileio.load_npy(clips_dir / f"{record['id']}.npy")  # (samples,) float32
    if mono.ndim != 1 or mono.size == 0:
        raise DataError(f"{clips_dir / record['id']}.npy: expected a non-empty (samples,) array, got {mono.shape}")
    db = log_mel(mono, sample_rate, params)
    fileio.write_npy(features_dir / f"{record['id']}.npy", db)
    image = ""
    if params.images:
        image = f"{images.label_slug(record['label'])}/{record['id']}.png"
        images.write_image(images_dir / image, db, params.top_db, params.image_size)
    return db.shape[0], image


def run(normalized: Path, features: Path, images_dir: Path, gallery: Path, audio: AudioParams,
        params: SpectrogramParams) -> None:
    """Features for every clip in ``normalized/index.csv``: arrays, index.csv, meta.json, PNGs, gallery."""
    index_path = normalized / "index.csv"
    index = fileio.read_csv(index_path)
    missing = sorted({"id", "label", "path"} - set(index.columns))
    if missing:
        raise DataError(f"{index_path}: missing column(s) {', '.join(missing)}")
    if index.empty:
        raise DataError(f"{index_path}: no clips")
    fileio.fresh_dir(features)
    fileio.fresh_dir(images_dir)  # created even when images is false: dvc.yaml declares it
    log_mel(np.zeros(params.n_fft, np.float32), audio.sample_rate, params)  # imports + filterbank, before workers fork
    if params.images:
        images.magma_lut()
    work = functools.partial(spectrogram_clip, clips_dir=normalized / "clips", features_dir=features,
                             images_dir=images_dir, sample_rate=audio.sample_rate, params=params)
    results = parallel.map_clips(work, index.to_dict("records"), params.workers, "spectrogram",
                                 name=lambda record: f"{record['path']} (id {record['id']})")
    index["frames"] = [frames for frames, _ in results]
    index["image"] = [image for _, image in results]
    fileio.write_csv(features / "index.csv", index)
    fileio.write_json(features / "meta.json", {
        "sample_rate": audio.sample_rate, "n_fft": params.n_fft, "hop_length": params.hop_length,
        "n_mels": params.n_mels, "fmin": params.fmin, "fmax": params.fmax, "top_db": params.top_db,
    })
    write_gallery(index, features, gallery, audio, params)
    log.info("log-mel features of %d clips (%d frames, %d mels) in %s; images %s", len(index),
             index["frames"].sum(), params.n_mels, features, images_dir if params.images else "off")


def write_gallery(index: pd.DataFrame, features: Path, gallery: Path, audio: AudioParams,
                  params: SpectrogramParams) -> None:
    """reports/gallery.png: the first ``gallery_per_class`` ids (sorted) of every class."""
    chosen = index.sort_values("id").groupby("label", sort=True).head(params.gallery_per_class)
    panels = [(row.label, row.id, fileio.load_npy(features / f"{row.id}.npy")) for row in chosen.itertuples()]
    images.write_gallery(gallery, panels, params.gallery_per_class, audio.sample_rate, params.hop_length,
                         params.fmin, params.fmax, params.top_db)
    log.info("gallery of %d clips (%d classes) in %s", len(panels), chosen["label"].nunique(), gallery)
