"""The log-mel front end in numpy: Slaney mel filterbank, centred power STFT, dB with a top_db floor.

The numbers of ``librosa.feature.melspectrogram`` + ``librosa.power_to_db`` (tested to
1e-3 dB; the filterbank to float rounding), without librosa at run time: importing it
(scipy.signal, numba) cost about a second per stage and per ``predict`` start, and its
per-call overhead was most of the cost on short clips. ``audiocnn.frontend`` computes the
same thing as Keras ops.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from audiocnn.spectrogram import SpectrogramParams

log = logging.getLogger(__name__)

SLANEY_F_SP = 200.0 / 3  # Hz per mel below 1 kHz (Slaney's scale, librosa's default)
SLANEY_LOGSTEP = np.log(6.4) / 27.0  # log-Hz per mel above 1 kHz
AMIN = 1e-10  # power floor before log10 (librosa.power_to_db's amin)
SILENCE_DB = -100.0  # 10 * log10(AMIN): the dB of zero power


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Hz -> Slaney mel (linear below 1 kHz, logarithmic above), as ``librosa.hz_to_mel``."""
    hz = np.asarray(hz, dtype=np.float64)
    mels = hz / SLANEY_F_SP
    return np.where(hz >= 1000.0, 1000.0 / SLANEY_F_SP + np.log(np.maximum(hz, 1e-12) / 1000.0) / SLANEY_LOGSTEP, mels)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Slaney mel -> Hz, the inverse of ``hz_to_mel`` (``librosa.mel_to_hz``)."""
    mels = np.asarray(mels, dtype=np.float64)
    low = 1000.0 / SLANEY_F_SP
    return np.where(mels >= low, 1000.0 * np.exp(SLANEY_LOGSTEP * (mels - low)), SLANEY_F_SP * mels)


def mel_frequencies(n: int, fmin: float, fmax: float) -> np.ndarray:
    """(n,) Hz, uniformly spaced on the mel scale from fmin to fmax (``librosa.mel_frequencies``)."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n))


@functools.lru_cache(maxsize=4)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
              preemphasis: float = 0.0) -> np.ndarray:
    """(n_mels, n_fft//2+1) float32 Slaney-normalized mel filterbank, built once per process.

    The same numbers as ``librosa.filters.mel`` (tested), without importing librosa
    (scipy.signal, numba: about a second per stage and per predict start). ``preemphasis`` a > 0
    weights each FFT bin by the power gain of y[n] - a * y[n-1], |1 - a e^(-iw)|^2: speech's
    pre-emphasis applied to the spectrum (the same as filtering the waveform, up to each frame's
    first sample), so the numpy and the Keras front end share it through this matrix.
    """
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # (bins,)
    edges_hz = mel_frequencies(n_mels + 2, fmin, fmax)  # (n_mels + 2,) band edges and centres
    ramps = np.subtract.outer(edges_hz, fft_hz)  # (n_mels + 2, bins)
    widths = np.diff(edges_hz)
    weights = np.zeros((n_mels, fft_hz.size), dtype=np.float32)
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    weights *= (2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels]))[:, np.newaxis]  # constant energy per band
    if preemphasis:
        omega = 2 * np.pi * fft_hz / sample_rate  # (bins,) radians per sample
        weights *= (1 - 2 * preemphasis * np.cos(omega) + preemphasis**2).astype(np.float32)  # (bins,) power gain
    if not np.all((edges_hz[:-2] == 0) | (weights.max(axis=1) > 0)):
        log.warning("empty mel bands: spectrogram.n_mels=%d is too many for n_fft=%d at %d Hz", n_mels, n_fft,
                    sample_rate)
    return weights


@functools.lru_cache(maxsize=4)
def hann_window(n_fft: int) -> np.ndarray:
    """(n_fft,) float32 periodic Hann window (``scipy.signal.get_window("hann", n_fft)``, librosa's default)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def log_mel(mono: np.ndarray, sample_rate: int, params: SpectrogramParams) -> np.ndarray:
    """(samples,) float32 -> (frames, n_mels) float32 log-mel power, dB re 1.0, floored at max - top_db.

    Centred frames with zero padding, periodic Hann, power 2 (librosa's defaults), one
    batched RFFT over a strided view of the frames; ``expected_frames`` frames: librosa's, plus the
    one or two after them that still overlap the clip's last samples.
    """
    n_fft, hop = params.n_fft, params.hop_length
    pad = n_fft // 2
    n_frames = expected_frames(mono.size, params)
    padded = np.zeros(max((n_frames - 1) * hop + n_fft, pad + mono.size), dtype=np.float32)
    padded[pad : pad + mono.size] = mono
    frames = np.lib.stride_tricks.as_strided(padded, (n_frames, n_fft), (hop * 4, 4), writeable=False)
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=1)  # (frames, bins) complex64
    power = np.square(spectrum.real) + np.square(spectrum.imag)  # (frames, bins) float32
    basis = mel_basis(sample_rate, n_fft, params.n_mels, params.fmin, params.fmax, params.preemphasis)
    mel = power @ basis.T  # (frames, n_mels)
    db = np.log10(np.maximum(mel, np.float32(AMIN)))
    db *= np.float32(10.0)
    return np.maximum(db, db.max() - np.float32(params.top_db))  # (frames, n_mels) float32 dB


def expected_frames(samples: int, params: SpectrogramParams) -> int:
    """Frames of ``log_mel`` for a clip of ``samples`` samples: every centred frame that overlaps it.

    Frame j is centred on sample j * hop_length and spans n_fft // 2 on each side, so frames
    j < (samples + n_fft // 2) / hop_length see the clip. librosa's centred STFT stops at
    1 + samples // hop_length; the one or two frames after it hold the clip's last samples, and
    an exported model that zero-pads the waveform computes them. Kept here, padding the features
    with silence (``data.silence_db``) equals zero-padding the waveform, frame for frame.
    """
    return overlapping_frames(samples, params.n_fft, params.hop_length)


def overlapping_frames(samples: int, n_fft: int, hop_length: int) -> int:
    """Centred frames (hop ``hop_length``, ``n_fft // 2`` each side) that overlap ``samples`` samples."""
    return 1 + (max(samples, 1) + n_fft // 2 - 1) // hop_length
