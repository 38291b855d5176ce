"""Model inputs from the pipeline's files: windowing math, clip loading, tf.data streams.

The numpy helpers (window sizes, silence padding, sliding windows, images) are shared by training
and evaluation, so both cut clips alike. The tf.data builders stream clips from the packed
features (``audiocnn.packed``): only each clip's (offset, frames) is shuffled
(``train.shuffle_buffer`` costs no feature memory), its rows are read inside the pipeline.
Training crops a random window per clip and epoch; validation takes the deterministic centre
window (one per clip: val_loss comparable across epochs); evaluation averages the model over
``sliding_windows``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from audiocnn import fileio, packed
from audiocnn.errors import DataError
from audiocnn.melspec import SILENCE_DB, overlapping_frames

if TYPE_CHECKING:  # tensorflow is imported lazily: stages that do not train must not pay for it
    import tensorflow as tf

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def window_frames(window_seconds: float, sample_rate: int, hop_length: int, n_fft: int) -> int:
    """Frames in a model window: the centred STFT frames that overlap window_seconds of audio.

    As many as ``log_mel`` gives for a clip exactly one window long, so such a clip (or a stream
    window) is one model input, and the exported model computes the same frames from the samples.
    """
    return overlapping_frames(int(round(window_seconds * sample_rate)), n_fft, hop_length)


def load_features(features_dir: str | Path, clip_id: str) -> np.ndarray:
    """One clip's log-mel features from the packed ``<features_dir>``: (frames, n_mels) float32 dB (a copy)."""
    return np.array(packed.open_folder(features_dir).clip(clip_id), dtype=np.float32)


def silence_db(x: np.ndarray, top_db: float) -> np.float32:
    """What digital silence is in a clip's (frames, n_mels) dB features: its peak - top_db, at least -100 dB.

    ``log_mel`` floors every frame there (power 1e-10 is -100 dB), so padding with it equals
    computing the features of the clip zero-padded as a waveform, which is what the exported
    waveform model does with a short clip. The clip's minimum would not: a recording with less
    than top_db of dynamic range never reaches the floor.
    """
    return np.maximum(x.max() - np.float32(top_db), np.float32(SILENCE_DB))


def pad_to(x: np.ndarray, frames: int, top_db: float) -> np.ndarray:
    """Pad (frames, n_mels) dB features at the end to at least ``frames`` with silence (``silence_db``).

    The features are absolute dB, so zero would be a loud pad. Clips already long enough are
    returned unchanged.
    """
    missing = frames - x.shape[0]
    if missing <= 0:
        return x
    return np.pad(x, ((0, missing), (0, 0)), constant_values=silence_db(x, top_db))


def center_crop(x: np.ndarray, frames: int, top_db: float) -> np.ndarray:
    """The centre ``frames`` of (frames, n_mels) features, silence-padded first when shorter (as validation does)."""
    x = pad_to(x, frames, top_db)
    start = (x.shape[0] - frames) // 2
    return x[start : start + frames]


def sliding_windows(x: np.ndarray, window_frames: int, hop_frames: int, top_db: float) -> np.ndarray:
    """(frames, n_mels) -> (n_windows, window_frames, n_mels) windows covering the whole clip.

    Windows start every ``hop_frames``; a last window aligned to the clip's end is added when the
    hop grid does not reach it. A clip shorter than one window gives one silence-padded window.
    """
    if window_frames < 1 or hop_frames < 1:
        raise ValueError(f"window_frames={window_frames} and hop_frames={hop_frames} must be >= 1")
    x = pad_to(x, window_frames, top_db)
    last = x.shape[0] - window_frames
    starts = list(range(0, last + 1, hop_frames))
    if starts[-1] != last:
        starts.append(last)
    return np.stack([x[s : s + window_frames] for s in starts])


def load_image(images_dir: str | Path, rel_path: str) -> np.ndarray:
    """A spectrogram PNG as (H, W, 3) float32 in [0, 1] (the seed model's input)."""
    from PIL import Image

    path = Path(images_dir) / rel_path
    if not rel_path:
        raise DataError(f"no image for a clip under {images_dir}: set spectrogram.images: true for model.arch seed")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return rgb / 255.0


def read_split(split_dir: str | Path, name: str) -> Any:
    """``<split_dir>/<name>.csv`` as a DataFrame of str columns; DataError when absent or empty."""
    path = Path(split_dir) / f"{name}.csv"
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    frame = fileio.read_csv(path)
    for column in ("id", "label"):
        if column not in frame.columns:
            raise DataError(f"{path}: missing column '{column}'")
    if frame.empty:
        raise DataError(f"{path}: no clips")
    return frame


def class_labels(train: Any) -> list[str]:
    """The class order: the sorted labels of the training split."""
    return sorted(set(train["label"]))


def label_indices(frame: Any, labels: Sequence[str], where: str) -> np.ndarray:
    """Labels -> int32 indices into ``labels``; DataError naming ``where`` for unknown labels."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {', '.join(unknown)} not in the training split")
    return np.array([index[label] for label in frame["label"]], dtype=np.int32)


def image_files(images_dir: str | Path, frame: Any) -> list[str]:
    """Each clip's PNG ``<images_dir>/<image>`` (the seed model's input); DataError if missing."""
    if "image" not in frame.columns or (frame["image"] == "").any():
        raise DataError(f"clips without an image under {images_dir}: "
                        "set spectrogram.images: true for model.arch seed")
    paths = [Path(images_dir) / name for name in frame["image"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) missing, first: {missing[0]}")
    return [str(p) for p in paths]


def sample_weights(labels: np.ndarray, n_classes: int, balanced: bool) -> np.ndarray:
    """Per-clip weights (float32): n / (classes * count[label]) when balanced, else 1 (sum stays n)."""
    if not balanced:
        return np.ones(len(labels), np.float32)
    counts = np.bincount(labels, minlength=n_classes)
    return (len(labels) / (n_classes * counts[labels])).astype(np.float32)


def feature_sample(features: packed.Packed, refs: np.ndarray, frames: int, top_db: float, limit: int,
                   seed: int) -> np.ndarray:
    """Centre windows of up to ``limit`` of the clips at ``refs`` (n, 2), drawn with ``seed``: (k, frames, n_mels).

    A bounded sample, e.g. to adapt the model's input normalization without loading every clip.
    """
    order = np.random.default_rng(seed).permutation(len(refs))[:limit]
    return np.stack([center_crop(np.array(features.rows(*refs[i]), np.float32), frames, top_db) for i in sorted(order)])


# --- tf.data -----------------------------------------------------------------------------------


def load_rows_tf(features: packed.Packed, ref: "tf.Tensor") -> "tf.Tensor":
    """Read one clip inside a tf.data map, ``ref`` its (offset, frames) int64: (frames, n_mels) float32 dB."""
    import tensorflow as tf

    # stateful=False: a pure function of the ref, so op determinism keeps the map parallel and prefetching
    x = tf.numpy_function(lambda offset, frames: np.array(features.rows(offset, frames), np.float32),
                          [ref[0], ref[1]], tf.float32, stateful=False)
    x.set_shape([None, features.width])
    return x


def crop_tf(x: "tf.Tensor", frames: int, top_db: float, seed: "tf.Tensor | None",
            shift: bool = False) -> "tf.Tensor":
    """Silence-pad (T, n_mels) to ``frames``, then crop: at a stateless-random start, or the centre if seed is None.

    A clip shorter than ``frames`` is padded at the end (as evaluation pads it), or with ``shift`` (and a
    seed) placed at a random offset, silence on both sides: a time-shift augmentation for short clips.
    The pad is ``silence_db``: the clip's peak - top_db, at least -100 dB.
    """
    import tensorflow as tf

    missing = tf.maximum(frames - tf.shape(x)[0], 0)
    before = 0
    if shift and seed is not None:
        seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        before = tf.random.stateless_uniform([], shift_seed, minval=0, maxval=missing + 1, dtype=tf.int32)
    x = tf.pad(x, [[before, missing - before], [0, 0]], constant_values=tf.maximum(tf.reduce_max(x) - top_db, SILENCE_DB))
    last = tf.shape(x)[0] - frames  # last valid start, >= 0
    if seed is None:
        start = last // 2
    else:
        start = tf.random.stateless_uniform([], seed, minval=0, maxval=last + 1, dtype=tf.int32)
    return x[start : start + frames]  # (frames, n_mels)


def eval_dataset(features: packed.Packed, refs: np.ndarray, labels: np.ndarray, n_classes: int, frames: int,
                 top_db: float, batch_size: int) -> "tf.data.Dataset":
    """Validation stream of the clips at ``refs`` (n, 2): centre windows -> ((batch, frames, n_mels, 1), one-hot)."""
    import tensorflow as tf

    def load(ref: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = crop_tf(load_rows_tf(features, ref), frames, top_db, None)
        return x[..., tf.newaxis], tf.one_hot(label, n_classes)

    ds = tf.data.Dataset.from_tensor_slices((refs, labels))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_png_tf(path: "tf.Tensor", size: int) -> "tf.Tensor":
    """Read one spectrogram PNG inside a tf.data map: (size, size, 3) float32 in [0, 1]."""
    import tensorflow as tf

    image = tf.ensure_shape(tf.io.decode_png(tf.io.read_file(path), channels=3), [size, size, 3])
    return tf.cast(image, tf.float32) / 255.0


def image_dataset(paths: Sequence[str], labels: np.ndarray, n_classes: int, size: int) -> "tf.data.Dataset":
    """Unbatched PNG stream for ``seed``: ((size, size, 3) float32 in [0, 1], one-hot (classes,))."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    return ds.map(lambda path, label: (load_png_tf(path, size), tf.one_hot(label, n_classes)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def noise_stream(features: packed.Packed, refs: np.ndarray, frames: int, top_db: float,
                 seed: int) -> "tf.data.Dataset":
    """Endless random windows (frames, n_mels) dB of the clips at ``refs`` (n, 2) (background-noise source)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(refs)
    ds = ds.shuffle(len(refs), seed=seed, reshuffle_each_iteration=True).repeat()
    seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(ds, seeds).map(lambda ref, s: crop_tf(load_rows_tf(features, ref), frames, top_db, s),
                                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_stream(items: "tf.data.Dataset", shuffle_buffer: int, seed: int,
                 transform: Callable[..., Any], batch_size: int,
                 batch_transform: Callable[..., Any] | None = None,
                 side: "tf.data.Dataset | None" = None) -> "tf.data.Dataset":
    """Shuffle ``items`` (clip refs or paths, labels, ...) each epoch, attach a per-example seed, map ``transform``.

    The seed stream is ``Dataset.random(seed)`` re-randomized on each iteration: a new crop and new
    augmentation every epoch, the same sequence for the same ``seed``. ``transform(*item, [side,] seed)``
    gets a stateless seed pair (2,) int64, and an element of the endless ``side`` stream (e.g. noise
    windows) when given; ``batch_transform(*batch, seed)`` likewise per batch.
    """
    import tensorflow as tf

    ds = items.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2)
    if side is None:
        ds = tf.data.Dataset.zip(ds, seeds).map(lambda item, s: transform(*item, s),
                                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = tf.data.Dataset.zip(ds, side, seeds).map(lambda item, extra, s: transform(*item, extra, s),
                                                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if batch_transform is not None:
        batch_seeds = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, batch_seeds).map(lambda batch, s: batch_transform(*batch, s),
                                                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
