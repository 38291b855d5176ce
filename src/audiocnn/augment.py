"""Training-time augmentation of log-mel windows (params section ``train.augment``).

Every op works on absolute dB features (log-mel power, ref 1.0) and takes an explicit
stateless seed pair, so the same ``train.seed`` gives the same augmented stream:
SpecAugment time/frequency masks (filled with the window's floor, never 0 dB), random
gain (a dB shift), background-noise mixing in the power domain at a random SNR, a random
time shift of clips shorter than the window, a random dynamic range (the noise floor of
another recording), and mixup on batches (soft labels). Each is disabled by a zero (or
false) in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from audiocnn import data
from audiocnn.config import ParamsError, check

if TYPE_CHECKING:
    import tensorflow as tf

    from audiocnn import packed


STRETCH_STREAM, WARP_STREAM, RANGE_STREAM = 101, 102, 103  # seed streams folded in for these: the other draws stay as they were


@dataclass(frozen=True)
class AugmentParams:
    """``train.augment``: each augmentation's strength; 0 disables it."""

    time_masks: int  # SpecAugment time masks per window
    time_mask_frames: int  # max width of a time mask (width ~ U[0, max])
    freq_masks: int  # SpecAugment frequency masks per window
    freq_mask_bins: int  # max width of a frequency mask, mel bins
    mixup_alpha: float  # Beta(alpha, alpha) mixing weights
    gain_db: float  # random gain within +-gain_db
    noise_prob: float  # probability of mixing a background window into a clip
    noise_snr_db: tuple[float, ...]  # [lo, hi] signal-to-noise ratio range, dB
    noise_class: str  # label of the noise clips; "" = any training clip
    time_shift: bool  # clips shorter than the window: placed at a random offset (else at the start)
    time_stretch: float  # clip length scaled by ~ U[1 - x, 1 + x] (speaking rate); 0 disables
    freq_warp: float  # mel axis scaled by ~ U[1 - x, 1 + x] (vocal tract length); 0 disables
    dynamic_range_db: float = 0.0  # window floored at its peak minus ~ U[x, spectrogram.top_db] dB; 0 disables

    def __post_init__(self) -> None:
        for key in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        check(self.mixup_alpha >= 0, "mixup_alpha", self.mixup_alpha, "must be >= 0 (0 disables mixup)")
        check(self.gain_db >= 0, "gain_db", self.gain_db, "must be >= 0 (0 disables random gain)")
        check(0.0 <= self.noise_prob <= 1.0, "noise_prob", self.noise_prob, "must be within [0, 1]")
        check(len(self.noise_snr_db) == 2, "noise_snr_db", list(self.noise_snr_db), "must be [lo, hi]")
        lo, hi = self.noise_snr_db
        check(lo <= hi, "noise_snr_db", list(self.noise_snr_db), "must have lo <= hi")
        for key in ("time_stretch", "freq_warp"):
            check(0.0 <= getattr(self, key) < 1.0, key, getattr(self, key), "must be in [0, 1) (0 disables)")
        check(self.dynamic_range_db >= 0, "dynamic_range_db", self.dynamic_range_db, "must be >= 0 dB (0 disables)")


def mask_axis(x: "tf.Tensor", axis: int, start: "tf.Tensor", width: "tf.Tensor", value: "tf.Tensor") -> "tf.Tensor":
    """Set ``x[start:start+width]`` along ``axis`` (0: frames, 1: mels) of (frames, n_mels) to ``value``."""
    import tensorflow as tf

    index = tf.range(tf.shape(x)[axis])
    inside = (index >= start) & (index < start + width)
    inside = inside[:, tf.newaxis] if axis == 0 else inside[tf.newaxis, :]
    return tf.where(inside, value, x)


def spec_augment(x: "tf.Tensor", seed: "tf.Tensor", p: AugmentParams) -> "tf.Tensor":
    """SpecAugment on (frames, n_mels) dB: random time and frequency masks filled with the window's floor."""
    import tensorflow as tf

    floor = tf.reduce_min(x)
    masks = [(0, p.time_mask_frames)] * p.time_masks + [(1, p.freq_mask_bins)] * p.freq_masks
    for i, (axis, max_width) in enumerate(masks):
        if max_width == 0:
            continue
        width_seed, start_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, i), 2))
        size = tf.shape(x)[axis]
        width = tf.minimum(tf.random.stateless_uniform([], width_seed, 0, max_width + 1, dtype=tf.int32), size)
        start = tf.random.stateless_uniform([], start_seed, 0, size - width + 1, dtype=tf.int32)
        x = mask_axis(x, axis, start, width, floor)
    return x


def stretch(x: "tf.Tensor", seed: "tf.Tensor", max_fraction: float, axis: int) -> "tf.Tensor":
    """Resize (frames, n_mels) dB along ``axis`` by one factor ~ U[1 - max_fraction, 1 + max_fraction] (bilinear).

    axis 0: a time stretch (speaking rate; the length changes). axis 1: a frequency warp, an
    approximation of vocal-tract-length perturbation on the mel scale; the result keeps n_mels bins
    (bins warped above the top are cut, missing ones filled with the floor).
    """
    import tensorflow as tf

    return scale_axis(x, tf.random.stateless_uniform([], seed, 1.0 - max_fraction, 1.0 + max_fraction), axis)


def scale_axis(x: "tf.Tensor", factor: "tf.Tensor | float", axis: int) -> "tf.Tensor":
    """``stretch`` by a given factor: (frames, n_mels) dB resized along ``axis`` (axis 1 keeps n_mels bins).

    ``models.warp_matrix`` is the same frequency warp (axis 1) as a fixed matrix, for test-time warps.
    """
    import tensorflow as tf

    frames, n_mels = tf.shape(x)[0], tf.shape(x)[1]
    size = tf.maximum(1, tf.cast(tf.round(tf.cast(tf.shape(x)[axis], tf.float32) * factor), tf.int32))
    shape = tf.stack([size, n_mels] if axis == 0 else [frames, size])
    y = tf.image.resize(x[..., tf.newaxis], shape, method="bilinear")[..., 0]
    if axis == 1:
        y = tf.pad(y, [[0, 0], [0, tf.maximum(n_mels - size, 0)]], constant_values=tf.reduce_min(x))[:, :n_mels]
        y = tf.ensure_shape(y, x.shape)
    return y


def random_range(x: "tf.Tensor", seed: "tf.Tensor", min_db: float, max_db: float) -> "tf.Tensor":
    """Floor (frames, n_mels) dB at its peak minus one range ~ U[min_db, max_db] dB.

    Recordings differ in how far their noise floor lies below the speech (FSDD: the 10th
    percentile of a clip's log-mel bins is 46 dB below its peak for one speaker, 51-69 dB for
    the others); a random floor keeps the model from telling speakers, or rooms, by it.
    """
    import tensorflow as tf

    range_db = tf.random.stateless_uniform([], seed, min_db, max_db)
    return tf.maximum(x, tf.reduce_max(x) - range_db)


def random_gain(x: "tf.Tensor", seed: "tf.Tensor", gain_db: float) -> "tf.Tensor":
    """Add one gain ~ U[-gain_db, gain_db] dB to the whole window."""
    import tensorflow as tf

    return x + tf.random.stateless_uniform([], seed, -gain_db, gain_db)


def mix_noise(x: "tf.Tensor", noise: "tf.Tensor", snr_db: "tf.Tensor") -> "tf.Tensor":
    """Add ``noise`` to ``x`` (both dB, same shape) in the power domain at ``snr_db`` (mean power ratio)."""
    import tensorflow as tf

    power = tf.pow(10.0, x / 10.0)
    noise_power = tf.pow(10.0, noise / 10.0)
    scale = tf.reduce_mean(power) / (tf.reduce_mean(noise_power) * tf.pow(10.0, snr_db / 10.0))
    return 10.0 * tf.math.log(power + scale * noise_power) / tf.math.log(10.0)


def random_noise(x: "tf.Tensor", label: "tf.Tensor", noise: "tf.Tensor", seed: "tf.Tensor",
                 p: AugmentParams, noise_label: int) -> "tf.Tensor":
    """With probability noise_prob, and only for clips whose label is not ``noise_label``, mix in ``noise``."""
    import tensorflow as tf

    draw_seed, snr_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    lo, hi = p.noise_snr_db
    snr_db = tf.random.stateless_uniform([], snr_seed, lo, hi) if hi > lo else tf.constant(lo)
    apply = (tf.random.stateless_uniform([], draw_seed) < p.noise_prob) & (label != noise_label)
    return tf.cond(apply, lambda: mix_noise(x, noise, snr_db), lambda: x)


def augment_window(x: "tf.Tensor", label: "tf.Tensor", noise: "tf.Tensor | None", seed: "tf.Tensor",
                   p: AugmentParams, top_db: float, noise_label: int = -1) -> "tf.Tensor":
    """One training window (frames, n_mels) dB: frequency warp, noise mixing, random range, gain, then masks.

    ``top_db``: the features' dynamic range (spectrogram.top_db), the upper end of ``dynamic_range_db``'s
    draw; ``window_transform`` has checked that it lies above ``dynamic_range_db``.
    """
    import tensorflow as tf

    noise_seed, gain_seed, mask_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if p.freq_warp > 0:
        x = stretch(x, tf.random.experimental.stateless_fold_in(seed, WARP_STREAM), p.freq_warp, axis=1)
    if noise is not None and p.noise_prob > 0:
        x = random_noise(x, label, noise, noise_seed, p, noise_label)
    if p.dynamic_range_db > 0:
        x = random_range(x, tf.random.experimental.stateless_fold_in(seed, RANGE_STREAM), p.dynamic_range_db, top_db)
    if p.gain_db > 0:
        x = random_gain(x, gain_seed, p.gain_db)
    return spec_augment(x, mask_seed, p)


def mixup(x: "tf.Tensor", y: "tf.Tensor", w: "tf.Tensor", seed: "tf.Tensor", alpha: float):
    """Mix each example of a batch with a random partner: lam ~ Beta(alpha, alpha) per example.

    x (batch, ...), y (batch, classes) one-hot or soft, w (batch,) sample weights; returns the
    mixed (x, y, w): labels stay distributions (rows sum to 1).
    """
    import tensorflow as tf

    gamma_seed, perm_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    batch = tf.shape(x)[0]
    gammas = tf.random.stateless_gamma([2, batch], gamma_seed, alpha=alpha)
    lam = gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-30)  # (batch,) ~ Beta(alpha, alpha); both 0 -> 0
    partner = tf.argsort(tf.random.stateless_uniform([batch], perm_seed))
    lam_x = tf.reshape(lam, tf.concat([[batch], tf.ones(tf.rank(x) - 1, tf.int32)], axis=0))
    x = lam_x * x + (1.0 - lam_x) * tf.gather(x, partner)
    y = lam[:, tf.newaxis] * y + (1.0 - lam[:, tf.newaxis]) * tf.gather(y, partner)
    w = lam * w + (1.0 - lam) * tf.gather(w, partner)
    return x, y, w


def noise_label(p: AugmentParams, labels: Sequence[str]) -> int:
    """Index of ``noise_class`` in ``labels`` (-1 for "": any clip is noise, every clip gets it)."""
    if not p.noise_class:
        return -1
    if p.noise_class not in labels:
        raise ParamsError(f"train.augment.noise_class={p.noise_class!r} is not a training label "
                          f"({', '.join(labels)}); use \"\" for any clip")
    return labels.index(p.noise_class)


def window_transform(features: packed.Packed, p: AugmentParams, frames: int, top_db: float, n_classes: int,
                     noise_label: int = -1) -> Callable[..., Any]:
    """The per-clip training map: (ref, label, weight, [noise window,] seed) -> (x, one-hot y, weight).

    Loads the clip at ``ref`` (offset, frames) of the packed ``features``, takes a random
    silence-padded window, augments it: x (frames, n_mels, 1) dB.
    """
    import tensorflow as tf

    if p.dynamic_range_db >= top_db:
        raise ParamsError(f"train.augment.dynamic_range_db={p.dynamic_range_db:g} must be below "
                          f"spectrogram.top_db={top_db:g} (the features' own range), or 0 to disable")

    def transform(ref: tf.Tensor, label: tf.Tensor, weight: tf.Tensor, *rest: tf.Tensor):
        *noise, seed = rest
        crop_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        x = data.load_rows_tf(features, ref)  # (T, n_mels) dB
        if p.time_stretch > 0:
            x = stretch(x, tf.random.experimental.stateless_fold_in(seed, STRETCH_STREAM), p.time_stretch, axis=0)
        x = data.crop_tf(x, frames, top_db, crop_seed, p.time_shift)  # (frames, n_mels) dB
        x = augment_window(x, label, noise[0] if noise else None, aug_seed, p, top_db, noise_label)
        return x[..., tf.newaxis], tf.one_hot(label, n_classes), weight  # (frames, n_mels, 1)

    return transform
