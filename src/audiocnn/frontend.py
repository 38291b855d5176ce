"""The log-mel front end as Keras ops, so an exported model takes the waveform (no librosa on a device).

It computes the frames of ``spectrogram.log_mel`` that a window covers: its input is every sample
under them (``Preprocess.segment_samples``: from ``n_fft // 2`` before the window to the end of
its last frame; zeros outside the clip, which is how ``librosa.stft`` pads centred frames), so
frame i is centred on the window's sample i * hop_length as in the whole clip's log-mel. The STFT is a
strided convolution with a periodic-Hann DFT basis, then the power spectrum, the librosa mel filterbank
(``spectrogram.mel_basis``) as a constant, ``10 * log10(max(power, 1e-10))`` (ref 1.0) and the
top_db floor below the window's maximum. No RFFT op: convolution, square, matmul and log
convert to TFLite builtins (and the convolution would quantize if the front end ever had to).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from audiocnn.errors import DataError

if TYPE_CHECKING:
    import keras

    from audiocnn.predict import Preprocess

AMIN = 1e-10  # librosa.power_to_db's floor on power


def dft_kernel(n_fft: int) -> np.ndarray:
    """(n_fft, 1, 2 * bins) float32 conv kernel: periodic Hann times [cos | -sin], bins = n_fft // 2 + 1."""
    n, k = np.arange(n_fft), np.arange(n_fft // 2 + 1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann (scipy 'hann', fftbins=True)
    angle = 2 * np.pi * np.outer(n, k) / n_fft  # float64, then float32: the librosa/numpy rfft basis
    basis = np.concatenate([window[:, None] * np.cos(angle), -window[:, None] * np.sin(angle)], axis=1)
    return basis.astype(np.float32)[:, np.newaxis, :]


def front_end(pre: Preprocess) -> "keras.layers.Layer":
    """A Keras layer: (batch, segment_samples) waveform -> (batch, window_frames, n_mels, 1) dB (``log_mel``'s frames)."""
    import keras
    from keras import ops

    from audiocnn.spectrogram import mel_basis

    sp = pre.spectrogram
    mel = mel_basis(pre.sample_rate, sp.n_fft, sp.n_mels, sp.fmin, sp.fmax, sp.preemphasis)  # (n_mels, bins)
    mel2 = np.concatenate([mel.T, mel.T]).astype(np.float32)  # (2 * bins, n_mels): re^2 and im^2 rows
    kernel = dft_kernel(sp.n_fft)

    class LogMel(keras.layers.Layer):
        def call(self, x):  # (batch, segment_samples): n_fft // 2 before the window, the window, the last frame's end
            x = x[:, :, None]  # frame i spans [i * hop, i * hop + n_fft): centred on window sample i * hop
            spec = ops.conv(x, kernel, strides=sp.hop_length, padding="valid")  # (batch, window_frames, 2 * bins)
            power = ops.matmul(ops.square(spec), mel2)  # (batch, frames, n_mels)
            db = ops.log(ops.maximum(power, AMIN)) * (10.0 / np.log(10.0))
            db = ops.maximum(db, ops.max(db, axis=(1, 2), keepdims=True) - sp.top_db)  # floor below the window max
            return db[..., None]  # (batch, frames, n_mels, 1)

    return LogMel(name="logmel")


def waveform_models(classifier: "keras.Model", pre: Preprocess) -> tuple["keras.Model", "keras.Model"]:
    """(waveform -> probabilities, waveform -> log-mel) Keras models around ``classifier``."""
    import keras

    expected = (pre.window_frames, pre.spectrogram.n_mels, 1)
    if tuple(classifier.input_shape[1:]) != expected:
        raise DataError(f"model input {classifier.input_shape[1:]} is not the log-mel window {expected}: "
                        "export supports model.arch cnn")
    wave = keras.Input((pre.segment_samples,), name="waveform")  # (batch, segment_samples) mono
    logmel = front_end(pre)(wave)
    return keras.Model(wave, classifier(logmel), name="waveform_classifier"), keras.Model(wave, logmel, name="frontend")
