"""Architectures (params section ``model``) and how a clip becomes model input.

``cnn``: a compact CNN on log-mel windows (batch, frames, n_mels, 1) dB with its input
normalization inside the model (per-mel mean/variance of training windows), so predict and
export need nothing outside model.keras. Sized for CPU training (>= 250 samples/s on 2 cores):
a strided stem, one conv block at half resolution, two blocks of two 3x3 convs, each block
ending in a 2x2 max-pool, a last conv at 1/16 resolution, global average pooling, dropout,
softmax; ~580k parameters and ~60M multiply-adds per 101 x 64 window at width 32.
``seed``: the notebook's network on (224, 224, 3) spectrogram images in [0, 1], for comparison.
``members`` > 1: that many networks of the architecture, trained one after another (audiocnn.train:
each from its own initial weights, shuffle and augmentation, with its own early stopping) and
saved as one model that outputs the mean of their probabilities (``ensemble``): it averages away
part of what one training seed decides.
``test_warps``: the saved model averages over frequency-warped copies of each window
(``warp_average``: test-time augmentation with training's freq_warp at fixed factors);
``test_stretches`` likewise over time-stretched copies (``stretch_average``, training's time_stretch);
``test_shifts`` over copies moved later in the window (``shift_average``, training's time_shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import numpy as np

from audiocnn import data
from audiocnn.config import check

if TYPE_CHECKING:
    import keras

Arch = Literal["cnn", "seed"]
MAX_MEMBERS = 8
MEMBER_PREFIX = "member"  # the ensemble's networks are layers member0, member1, ...
WARP_RANGE = (0.5, 2.0)  # test_warps and test_stretches: scale factors allowed
MAX_SHIFT_SECONDS = 60.0  # test_shifts: seconds allowed (the window bounds them again at train time)


@dataclass(frozen=True)
class ModelParams:
    """``model``: the architecture and its size."""

    arch: Arch  # cnn | seed
    width: int  # filters in the first block (cnn); doubles per block
    dropout: float  # before the classifier
    band_norm: bool  # cnn: subtract each mel band's mean over the window (removes a microphone's colouring)
    lifter: int  # cnn: keep each frame's first `lifter` cepstral coefficients (spectral envelope); 0 = off
    members: int  # networks averaged (an ensemble), each trained alone from its own seed; 1 = one
    test_warps: tuple[float, ...] = ()  # cnn: mel-axis scale factors whose predictions the saved model averages
    test_stretches: tuple[float, ...] = ()  # cnn: time-axis scale factors, the same (around each warp)
    test_shifts: tuple[float, ...] = ()  # cnn: seconds each window is moved later, the same (around each stretch)

    def __post_init__(self) -> None:
        check(4 <= self.width <= 512, "width", self.width, "must be within 4..512")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.lifter >= 0, "lifter", self.lifter, "must be >= 0 (0 = off)")
        check(1 <= self.members <= MAX_MEMBERS, "members", self.members, f"must be within 1..{MAX_MEMBERS}")
        for key in ("test_warps", "test_stretches"):
            factors = list(getattr(self, key))
            check(all(WARP_RANGE[0] <= f <= WARP_RANGE[1] for f in factors), key, factors,
                  f"factors must be within {WARP_RANGE[0]}..{WARP_RANGE[1]}")
            check(len(set(factors)) == len(factors), key, factors, "must not repeat a factor")
            check(not factors or self.arch == "cnn", key, factors, "needs model.arch cnn (log-mel input)")
        shifts = list(self.test_shifts)
        check(all(0.0 <= s <= MAX_SHIFT_SECONDS for s in shifts), "test_shifts", shifts,
              f"must be within 0..{MAX_SHIFT_SECONDS:g} s")
        check(len(set(shifts)) == len(shifts), "test_shifts", shifts, "must not repeat a shift")
        check(not shifts or self.arch == "cnn", "test_shifts", shifts, "needs model.arch cnn (log-mel input)")


def model_input(arch: str, row: Mapping[str, str], *, features_dir: str | Path, images_dir: str | Path,
                window_frames: int, hop_frames: int, top_db: float) -> np.ndarray:
    """One clip (a split CSV row: ``id``, ``image``) as a batch of model inputs.

    ``cnn``: (n_windows, window_frames, n_mels, 1) float32 dB, sliding windows over the whole clip;
    ``seed``: (1, H, W, 3) float32 in [0, 1], the clip's image. A clip's prediction is the mean of the
    model's outputs over this batch.
    """
    if arch == "cnn":
        x = data.load_features(features_dir, row["id"])  # (frames, n_mels) float32 dB
        return data.sliding_windows(x, window_frames, hop_frames, top_db)[..., np.newaxis]
    if arch == "seed":
        return data.load_image(images_dir, row["image"])[np.newaxis]
    raise ValueError(f"model.arch={arch!r} must be one of 'cnn', 'seed'")


def build(params: ModelParams, n_classes: int, input_shape: tuple[int, ...],
          norm_sample: np.ndarray | None = None, name: str | None = None) -> "keras.Model":
    """One ``params.arch`` network for ``input_shape`` (without batch) and ``n_classes`` softmax outputs.

    ``norm_sample`` (n, frames, n_mels) dB: training windows whose per-mel mean/variance the cnn's
    Normalization layer uses; without it, adapt ``model.get_layer("normalize")`` before training.
    ``name``: the model's name (default the arch; ``member_name(k)`` for an ensemble's networks).
    ``params.members`` is train's concern: it builds that many of these and joins them (``ensemble``).
    """
    if params.arch == "cnn":
        return build_cnn(n_classes, input_shape, params.width, params.dropout, norm_sample, params.band_norm,
                         params.lifter, name=name or "cnn")
    return build_seed(n_classes, input_shape, name=name or "seed")


def member_name(member: int) -> str:
    """The name of an ensemble's network ``member`` (0-based): a layer of the saved model."""
    return f"{MEMBER_PREFIX}{member}"


def ensemble(networks: list["keras.Model"], name: str) -> "keras.Model":
    """One model whose output is the mean of ``networks``' probabilities (same input and output shapes).

    Stock layers only (nested models, Average): safe-mode loading and TFLite conversion need
    nothing custom, so evaluate, predict and export treat it as any other model.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=networks[0].input_shape[1:], name=networks[0].inputs[0].name)
    outputs = layers.Average(name="mean_probabilities")([net(inputs) for net in networks])
    return keras.Model(inputs, outputs, name=name)


def warp_matrix(n_mels: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A frequency warp as fixed weights: ``frame @ kernel + fill * floor`` = ``augment.scale_axis(frame, factor, 1)``.

    Any axis the same way: ``warp_matrix(frames, f)`` on a band's frames is the time stretch
    ``augment.scale_axis(window, f, 0)`` cut or floor-filled to the window's frames.

    kernel (n_mels, n_mels) float32: bilinear resampling of the mel axis to round(n_mels * factor)
    bins (tf.image.resize with half-pixel centres), cut to n_mels; fill (n_mels,) float32: 1 for the
    bins a shrinking warp leaves empty, which training's warp fills with the window's floor (minimum).
    """
    size = max(1, int(np.round(np.float32(n_mels) * np.float32(factor))))
    scale = np.float32(n_mels) / np.float32(size)
    kernel = np.zeros((n_mels, n_mels), np.float64)
    for out in range(min(size, n_mels)):
        source = (out + 0.5) * scale - 0.5  # position on the input's mel axis
        lower, upper = max(int(np.floor(source)), 0), min(int(np.ceil(source)), n_mels - 1)
        frac = source - np.floor(source)
        kernel[lower, out] += 1.0 - frac
        kernel[upper, out] += frac
    fill = (np.arange(n_mels) >= size).astype(np.float32)
    return kernel.astype(np.float32), fill


def shift_matrix(frames: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A time shift as fixed weights: ``band @ kernel + fill * floor`` moves a window ``shift`` frames later.

    Frame t becomes frame t + shift; the first ``shift`` frames are the floor and the last ``shift``
    fall off the end (for a clip shorter than the window, padding: evaluate places it at the start).
    kernel (frames, frames) float32 with kernel[t, t + shift] = 1; fill (frames,) float32: 1 for the
    first ``shift`` frames, as ``warp_matrix``'s fill.
    """
    if not 0 <= shift < frames:
        raise ValueError(f"shift={shift} frames must be within 0..{frames - 1} (the window's frames)")
    kernel = np.eye(frames, k=shift, dtype=np.float32)  # (frames in, frames out)
    fill = (np.arange(frames) < shift).astype(np.float32)
    return kernel, fill


def warp_average(model: "keras.Model", warps: Sequence[float], name: str) -> "keras.Model":
    """One model whose output is the mean of ``model``'s probabilities over frequency-warped copies of its input.

    Test-time augmentation for ``model.test_warps``: the warps training draws from
    (``train.augment.freq_warp``, a vocal-tract-length perturbation), here a fixed few, so a voice
    is judged as if its vocal tract were a little longer or shorter too. Each warp is a fixed
    matrix product (``warp_matrix``) and a floor fill from the window's minimum; stock layers only
    (Dense, Reshape, Rescaling, GlobalMaxPooling2D, Permute, Add, Average), so safe-mode loading
    and TFLite conversion need nothing custom.
    """
    n_mels = model.input_shape[2]
    return _view_average(model, [None if f == 1.0 else warp_matrix(n_mels, f) for f in warps], "warp", name)


def stretch_average(model: "keras.Model", stretches: Sequence[float], name: str) -> "keras.Model":
    """One model whose output is the mean of ``model``'s probabilities over time-stretched copies of its input.

    Test-time augmentation for ``model.test_stretches``: training's ``train.augment.time_stretch``
    (speaking rate) at fixed factors, applied to the window from its start: a stretch cuts the end,
    a shrink fills it with the window's floor (``warp_matrix`` on the time axis). Training never
    shows the network an unresampled window (its stretch factor is drawn, never exactly 1), so
    the average also judges each window as the network learned to see windows. Stock layers, as
    ``warp_average``; ``model`` may itself be a warp average (every stretch of every warp).
    """
    frames = model.input_shape[1]
    return _view_average(model, [None if f == 1.0 else warp_matrix(frames, f) for f in stretches], "stretch", name)


def shift_average(model: "keras.Model", shifts: Sequence[int], name: str) -> "keras.Model":
    """One model whose output is the mean of ``model``'s probabilities over copies of its input moved later in time.

    Test-time augmentation for ``model.test_shifts`` (``shifts`` in frames, 0 = the window as it
    is): training's ``train.augment.time_shift`` places a clip shorter than the window at a random
    offset, so the network seldom saw one at the very start, where evaluate and predict place it;
    each shift moves the window ``shift_matrix``'s way (floor in front, the end cut). Stock layers,
    as ``warp_average``; ``model`` may itself be a stretch or warp average.
    """
    frames = model.input_shape[1]
    return _view_average(model, [None if k == 0 else shift_matrix(frames, k) for k in shifts], "shift", name)


def _view_average(model: "keras.Model", views: Sequence[tuple[np.ndarray, np.ndarray] | None],
                  kind: Literal["warp", "stretch", "shift"], name: str) -> "keras.Model":
    """The mean of ``model`` over fixed linear views of its input: ``views`` are (kernel, fill) on the mel
    axis (``warp``) or the time axis (``stretch``, ``shift``), None for the input as it is."""
    import keras
    from keras import layers

    frames, n_mels = model.input_shape[1], model.input_shape[2]
    size = n_mels if kind == "warp" else frames  # the axis the views act on
    inputs = keras.Input(shape=model.input_shape[1:], name=model.inputs[0].name)  # (batch, frames, n_mels, 1) dB
    flat = layers.Reshape((frames, n_mels), name=f"{kind}_frames")(inputs)
    if kind != "warp":
        flat = layers.Permute((2, 1), name=f"{kind}_bands")(flat)  # (batch, n_mels, frames): Dense acts on time
    minus_floor = layers.GlobalMaxPooling2D(keepdims=True, name=f"{kind}_minus_floor")(
        layers.Rescaling(-1.0, name=f"{kind}_negate")(inputs))  # (batch, 1, 1, 1): -min of the window
    outputs = []
    for k, view in enumerate(views):
        if view is None:
            outputs.append(model(inputs))
            continue
        kernel, fill = view
        scale = layers.Dense(size, use_bias=False, trainable=False, name=f"{kind}{k}")
        x = scale(flat)  # warp: (batch, frames, n_mels); stretch, shift: (batch, n_mels, frames)
        if kind != "warp":
            x = layers.Permute((2, 1), name=f"{kind}{k}_frames")(x)
        x = layers.Reshape((frames, n_mels, 1), name=f"{kind}{k}_out")(x)  # (batch, frames, n_mels, 1)
        scale.set_weights([kernel])
        if fill.any():
            floor = layers.Dense(size, use_bias=False, trainable=False, name=f"{kind}{k}_fill")
            # (batch, 1, 1, size) -> warp: (batch, 1, n_mels, 1); stretch, shift: (batch, frames, 1, 1)
            order = (1, 3, 2) if kind == "warp" else (3, 1, 2)
            filled = layers.Permute(order, name=f"{kind}{k}_fill_{'bins' if kind == 'warp' else 'frames'}")(
                floor(minus_floor))
            floor.set_weights([-fill[np.newaxis, :]])
            x = layers.Add(name=f"{kind}{k}_filled")([x, filled])
        outputs.append(model(x))
    mean = layers.Average(name=f"mean_over_{kind}s")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, mean, name=name)


def lifter_matrix(n_mels: int, keep: int) -> np.ndarray:
    """(n_mels, n_mels) float32 S: ``frame @ S`` keeps a log-mel frame's first ``keep`` DCT-II coefficients.

    The low cepstral coefficients are the spectral envelope (formants: what is said); the high
    ones hold the fine structure (pitch harmonics: who says it). S = D.T diag(mask) D with the
    orthonormal DCT-II D, so S is symmetric and ``keep >= n_mels`` gives the identity.
    """
    from scipy.fft import dct as dct_ii

    dct = dct_ii(np.eye(n_mels), type=2, norm="ortho", axis=0)  # (coefficient, band), orthonormal
    mask = (np.arange(n_mels) < keep).astype(np.float64)
    return (dct.T @ (mask[:, np.newaxis] * dct)).astype(np.float32)


def build_cnn(n_classes: int, input_shape: tuple[int, ...], width: int, dropout: float,
              norm_sample: np.ndarray | None = None, band_norm: bool = False, lifter: int = 0,
              name: str = "cnn") -> "keras.Model":
    """Compact log-mel CNN: (batch, frames, n_mels, 1) dB -> (batch, n_classes) probabilities.

    ``band_norm``: after the global per-band normalization, subtract each band's mean over the
    window (cepstral mean normalization on the mel axis): a fixed spectral colouring, such as
    one microphone's response or one room's, is removed before the network sees it. Built from
    stock layers (average pooling over time, a broadcast subtraction): safe-mode loading and
    TFLite conversion need nothing custom.

    ``lifter`` > 0: first, each frame's log-mel spectrum is smoothed to its first ``lifter``
    cepstral coefficients (``lifter_matrix``, a fixed matrix product), as MFCC front ends do
    for speaker-independent speech recognition; the normalization is then of smoothed frames.
    """
    import keras
    from keras import layers

    frames, n_mels = input_shape[0], input_shape[1]
    smooth = lifter_matrix(n_mels, lifter) if 0 < lifter < n_mels else None
    if norm_sample is not None and smooth is not None:
        norm_sample = norm_sample @ smooth  # (n, frames, n_mels) dB, smoothed
    if norm_sample is not None:
        mean = norm_sample.mean(axis=(0, 1))  # (n_mels,)
        variance = np.maximum(norm_sample.var(axis=(0, 1)), 1e-6)
        norm = layers.Normalization(axis=2, mean=mean, variance=variance, name="normalize")
    else:
        norm = layers.Normalization(axis=2, name="normalize")

    def conv(x, filters: int, strides: int = 1, name: str = ""):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)  # small data: few steps
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input(shape=input_shape, name="logmel")  # (batch, frames, n_mels, 1) dB
    x = inputs
    if smooth is not None:
        x = layers.Reshape((frames, n_mels), name="frames")(x)
        lifter_layer = layers.Dense(n_mels, use_bias=False, trainable=False, name="lifter")
        x = lifter_layer(x)  # (batch, frames, n_mels) dB; kernel set to ``smooth`` below
        lifter_layer.set_weights([smooth])
        x = layers.Reshape((frames, n_mels, 1), name="smoothed")(x)
    x = norm(x)
    if band_norm:
        band_mean = layers.AveragePooling2D(pool_size=(frames, 1), name="band_mean")(x)  # (batch, 1, n_mels, 1)
        x = layers.Subtract(name="minus_band_mean")([x, band_mean])
    x = conv(x, width // 2, strides=2, name="stem")  # (batch, frames/2, n_mels/2, w/2)
    x = conv(x, width, name="b1")
    x = layers.MaxPooling2D(2, padding="same", name="b1_pool")(x)  # (batch, frames/4, n_mels/4, w)
    for i, filters in enumerate((2 * width, 4 * width), start=2):
        x = conv(x, filters, name=f"b{i}a")
        x = conv(x, filters, name=f"b{i}b")
        x = layers.MaxPooling2D(2, padding="same", name=f"b{i}_pool")(x)  # b2: /8, 2w; b3: /16, 4w
    x = conv(x, 8 * width, name="b4")
    x = layers.GlobalAveragePooling2D(name="pool")(x)  # (batch, 8w)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=name)


def build_seed(n_classes: int, input_shape: tuple[int, ...], name: str = "seed") -> "keras.Model":
    """The notebook's network: Conv2D 32-128-128-128 (3x3 relu, 2x2 max-pool), Flatten, Dense 1024, softmax."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")  # (batch, 224, 224, 3) in [0, 1]
    x = inputs
    for i, filters in enumerate((32, 128, 128, 128), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(1024, activation="relu", name="dense")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=name)
