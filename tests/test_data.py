"""data.py: windowing math, silence padding, sliding windows, images, and the tf.data streams."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audiocnn import data, fileio, packed, store
from audiocnn.errors import DataError

N_MELS = 8
TOP_DB = 10.0  # silence in ramp(n) features: their peak (n - 81) - TOP_DB = n - 91 dB


def ramp(frames: int) -> np.ndarray:
    """(frames, N_MELS) features whose value at frame t is t - 80 (dB), so a window's start is readable."""
    return np.repeat(np.arange(frames, dtype=np.float32)[:, None] - 80.0, N_MELS, axis=1)


def write_clips(tmp_path, lengths: dict[str, int]) -> tuple[packed.Packed, np.ndarray]:
    """Ramps of the given frame counts, packed: (the features, their (n, 2) refs in the given order)."""
    packed.write(tmp_path, {clip_id: ramp(frames) for clip_id, frames in lengths.items()})
    features = packed.open_folder(tmp_path)
    return features, features.refs_of(list(lengths))


@pytest.mark.parametrize(
    ("window_seconds", "sample_rate", "hop_length", "n_fft", "expected"),
    [(1.0, 16000, 160, 512, 102), (0.5, 16000, 160, 512, 52), (1.0, 8000, 80, 256, 102), (1.0, 8000, 256, 256, 32),
     (0.01, 16000, 160, 512, 3), (0.3, 16000, 160, 400, 32)],
)
def test_window_frames(window_seconds, sample_rate, hop_length, n_fft, expected):
    assert data.window_frames(window_seconds, sample_rate, hop_length, n_fft) == expected
    # as many frames as log_mel gives for a clip exactly one window long
    from audiocnn.melspec import overlapping_frames

    assert overlapping_frames(round(window_seconds * sample_rate), n_fft, hop_length) == expected


def test_pad_to_pads_with_silence_not_the_clip_minimum():
    x = ramp(5)  # values -80..-76 dB: less dynamic range than TOP_DB
    padded = data.pad_to(x, 9, TOP_DB)
    assert padded.shape == (9, N_MELS)
    np.testing.assert_array_equal(padded[:5], x)
    assert np.all(padded[5:] == -86.0)  # peak -76 - TOP_DB, below the clip's minimum -80
    assert data.pad_to(x, 3, TOP_DB) is x  # long enough: unchanged
    quiet = np.full((2, N_MELS), -95.0, np.float32)
    assert np.all(data.pad_to(quiet, 4, TOP_DB)[2:] == -100.0)  # never below log_mel's -100 dB (power 1e-10)


def test_silence_padding_equals_features_of_a_zero_padded_waveform():
    """A short clip padded in the feature domain = log_mel of the clip zero-padded to the window (the export)."""
    from audiocnn.melspec import log_mel
    from audiocnn.spectrogram import SpectrogramParams

    p = SpectrogramParams(n_fft=256, hop_length=64, n_mels=16, fmin=20.0, fmax=4000.0, top_db=80.0, preemphasis=0.0,
                          workers=1, images=False, image_size=32, gallery_per_class=1)
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(1600) + 0.01).astype(np.float32)  # 0.2 s at 8 kHz, noisy: < 80 dB range
    window = np.zeros(8000, np.float32)  # 1 s
    window[: clip.size] = clip
    whole = log_mel(window, 8000, p)[:126]  # (126, 16): the window's frames
    own = log_mel(clip, 8000, p)
    assert len(own) == 1 + 1600 // 64 + 1  # librosa's frames + the one that still overlaps the clip's end
    np.testing.assert_allclose(data.pad_to(own, 126, p.top_db), whole, atol=1e-4)


def test_center_crop():
    np.testing.assert_array_equal(data.center_crop(ramp(10), 4, TOP_DB)[:, 0], np.array([3, 4, 5, 6]) - 80.0)
    assert data.center_crop(ramp(2), 4, TOP_DB)[:, 0].tolist() == [-80.0, -79.0, -89.0, -89.0]


def test_sliding_windows_cover_clip_and_end_aligned():
    windows = data.sliding_windows(ramp(10), 4, 3, TOP_DB)  # starts 0, 3, 6 (6 + 4 = 10: already at the end)
    assert windows.shape == (3, 4, N_MELS)
    assert windows[:, 0, 0].tolist() == [-80.0, -77.0, -74.0]
    windows = data.sliding_windows(ramp(11), 4, 3, TOP_DB)  # starts 0, 3, 6 and the end-aligned 7
    assert windows[:, 0, 0].tolist() == [-80.0, -77.0, -74.0, -73.0]
    assert windows[-1, -1, 0] == 10 - 80.0  # the last frame is covered


def test_sliding_windows_short_clip_is_one_padded_window():
    windows = data.sliding_windows(ramp(3), 5, 2, TOP_DB)
    assert windows.shape == (1, 5, N_MELS)
    assert windows[0, 3:, 0].tolist() == [-88.0, -88.0]


def test_load_features_errors_name_the_file_or_clip(tmp_path):
    with pytest.raises(DataError, match="features.npy"):
        data.load_features(tmp_path, "nope")
    write_clips(tmp_path, {"a": 3, "b": 5})
    np.testing.assert_array_equal(data.load_features(tmp_path, "b"), ramp(5))
    with pytest.raises(DataError, match=f"no features for clip 'nope' in {tmp_path}"):
        data.load_features(tmp_path, "nope")
    fileio.write_npy(tmp_path / "features.npy", np.zeros(5, np.float32))
    with pytest.raises(DataError, match="features.npy: expected a 2-D float32 array of features"):
        data.load_features(tmp_path, "a")
    whole = store.npy_bytes(np.zeros((8, N_MELS), np.float32))
    (tmp_path / "features.npy").write_bytes(whole[:-4])
    with pytest.raises(DataError, match="features.npy: .* bytes, not the \\(8, 8\\) float32 array .*truncated"):
        data.load_features(tmp_path, "a")
    fileio.write_npy(tmp_path / "features.npy", np.zeros((7, N_MELS), np.float32))  # 8 rows listed
    with pytest.raises(DataError, match="index.csv: clip b has rows 3\\+5 outside .*features.npy \\(7 rows\\)"):
        data.load_features(tmp_path, "a")


def test_packed_features_are_reopened_when_rewritten(tmp_path):
    write_clips(tmp_path, {"a": 3})
    np.testing.assert_array_equal(data.load_features(tmp_path, "a"), ramp(3))
    write_clips(tmp_path, {"a": 4})  # same names, new files
    np.testing.assert_array_equal(data.load_features(tmp_path, "a"), ramp(4))


def test_open_folder_reuses_an_unchanged_folder_and_notices_a_new_shard(tmp_path, monkeypatch):
    features, _ = write_clips(tmp_path, {"a": 3, "b": 2})
    monkeypatch.chdir(tmp_path.parent)
    assert packed.open_folder(tmp_path.name) is features  # the same folder by a relative path: not reopened
    fileio.write_npy(tmp_path / "features.1.npy", ramp(4))  # a shard appears: the folder is read again
    fileio.write_columns(tmp_path / "index.csv", {"id": ["a", "b", "c"], "offset": [0, 3, 5], "frames": [3, 2, 4]})
    reopened = packed.open_folder(tmp_path)
    assert reopened is not features and reopened.shape == (9, N_MELS)
    np.testing.assert_array_equal(reopened.clip("c"), ramp(4))


def test_a_folder_opens_with_index_columns_already_read(tmp_path, monkeypatch):
    packed.write(tmp_path, {"a": ramp(3), "b": ramp(2)})
    columns = fileio.read_columns(tmp_path / "index.csv")

    def no_second_read(*args, **kwargs):
        raise AssertionError("index.csv read again")

    monkeypatch.setattr(fileio, "read_columns", no_second_read)
    np.testing.assert_array_equal(packed.open_stamped(packed.stamp(tmp_path), index=columns).clip("b"), ramp(2))


def test_a_stamped_folder_opens_without_looking_at_its_files_again(tmp_path, monkeypatch):
    import os
    import pickle

    write_clips(tmp_path, {"a": 3})
    stamped = pickle.loads(pickle.dumps(packed.stamp(tmp_path)))  # as a stage hands it to its workers
    features = packed.open_stamped(stamped)

    def no_stat(*args, **kwargs):
        raise AssertionError("stat called")

    monkeypatch.setattr(os, "stat", no_stat)
    assert packed.open_stamped(stamped) is features
    monkeypatch.undo()
    with pytest.raises(DataError, match="cannot read features .*missing.*features.npy"):
        packed.stamp(tmp_path / "missing")


def test_open_folder_keeps_a_bounded_number_of_folders_open(tmp_path):
    opened = []
    for k in range(packed.OPEN_FOLDERS + 2):
        opened.append(write_clips(tmp_path / str(k), {"a": 1})[0])
    assert len(packed._OPENED) <= packed.OPEN_FOLDERS
    assert packed.open_folder(tmp_path / "0") is not opened[0]  # the least recently used was dropped
    assert packed.open_folder(tmp_path / str(packed.OPEN_FOLDERS + 1)) is opened[-1]


def test_load_image_rgb_unit_range(tmp_path):
    pixels = np.zeros((6, 6, 3), np.uint8)
    pixels[0, 0] = (255, 0, 128)
    (tmp_path / "dog").mkdir()
    Image.fromarray(pixels).save(tmp_path / "dog" / "a.png")
    image = data.load_image(tmp_path, "dog/a.png")
    assert image.dtype == np.float32 and image.shape == (6, 6, 3)
    np.testing.assert_allclose(image[0, 0], [1.0, 0.0, 128 / 255])


def test_label_indices_rejects_unknown_labels():
    import pandas as pd

    frame = pd.DataFrame({"id": ["a", "b"], "label": ["cat", "owl"]})
    with pytest.raises(DataError, match="owl"):
        data.label_indices(frame, ["cat", "dog"], "val.csv")


def first_frames(ds) -> list[float]:
    """The first frame value (the crop start - 80) of each example, in stream order."""
    return [float(v) for x, _ in ds.unbatch().as_numpy_iterator() for v in [x[0, 0]]]


def test_train_stream_crops_vary_per_epoch_but_repeat_per_seed(tmp_path):
    import tensorflow as tf

    features, refs = write_clips(tmp_path, {f"c{i}": 40 + i for i in range(6)})
    labels = np.arange(6, dtype=np.int32)

    def crop(ref, label, seed):
        return data.crop_tf(data.load_rows_tf(features, ref), 10, TOP_DB, seed), label

    def stream(seed):
        items = tf.data.Dataset.from_tensor_slices((refs, labels))
        return data.train_stream(items, shuffle_buffer=6, seed=seed, transform=crop, batch_size=4)

    batch_x, batch_y = next(iter(stream(3)))
    assert batch_x.shape == (4, 10, N_MELS) and batch_y.shape == (4,)
    ds = stream(3)
    epoch1, epoch2 = first_frames(ds), first_frames(ds)
    assert len(epoch1) == 6 and epoch1 != epoch2  # new crops (and order) each epoch
    again = stream(3)
    assert first_frames(again) == epoch1 and first_frames(again) == epoch2  # same seed, same sequence
    assert first_frames(stream(4)) != epoch1


def test_eval_dataset_centre_windows(tmp_path):
    features, refs = write_clips(tmp_path, {"long": 20, "short": 3})
    ds = data.eval_dataset(features, refs, np.array([1, 0], np.int32), n_classes=2, frames=6, top_db=TOP_DB,
                           batch_size=8)
    x, y = next(iter(ds))
    assert x.shape == (2, 6, N_MELS, 1) and y.shape == (2, 2)
    np.testing.assert_array_equal(x[0, :, 0, 0], np.arange(7, 13) - 80.0)  # centre of 20 frames
    np.testing.assert_array_equal(x[1, :, 0, 0], [-80, -79, -78, -88, -88, -88])  # silence-padded
    np.testing.assert_array_equal(y.numpy(), [[0, 1], [1, 0]])


def test_feature_sample_is_bounded_and_seeded(tmp_path):
    features, refs = write_clips(tmp_path, {f"c{i}": 12 for i in range(5)})
    sample = data.feature_sample(features, refs, 8, TOP_DB, limit=3, seed=1)
    assert sample.shape == (3, 8, N_MELS)
    np.testing.assert_array_equal(sample, data.feature_sample(features, refs, 8, TOP_DB, limit=3, seed=1))


def test_crop_tf_time_shift_places_short_clips_at_random_offsets(tmp_path):
    import tensorflow as tf

    x = tf.constant(ramp(4))  # frames -80..-77 dB, silence -87
    starts = set()
    for i in range(40):
        out = data.crop_tf(x, 10, TOP_DB, tf.constant([3, i], tf.int64), shift=True).numpy()[:, 0]
        start = int(np.argmax(out == -79.0)) - 1  # the clip's second frame is unique
        np.testing.assert_array_equal(out[start : start + 4], [-80, -79, -78, -77])
        assert np.sum(out == -87.0) == 6  # silence on either side
        starts.add(start)
    assert starts == set(range(7))  # every offset 0..frames-4 occurs
    unshifted = data.crop_tf(x, 10, TOP_DB, tf.constant([3, 0], tf.int64)).numpy()[:, 0]
    np.testing.assert_array_equal(unshifted[:4], [-80, -79, -78, -77])  # default: padded at the end only
