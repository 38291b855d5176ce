"""augment.py: each augmentation does what it claims, seeded, and its params are validated."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from audiocnn.augment import AugmentParams
from audiocnn.config import ParamsError, load_section
from conftest import real_params

tf = pytest.importorskip("tensorflow")
from audiocnn import augment  # noqa: E402

OFF = dict(time_masks=0, time_mask_frames=0, freq_masks=0, freq_mask_bins=0, mixup_alpha=0.0, gain_db=0.0,
           noise_prob=0.0, noise_snr_db=(5.0, 20.0), noise_class="", time_shift=False,
           time_stretch=0.0, freq_warp=0.0)


def params(**changes) -> AugmentParams:
    return AugmentParams(**{**OFF, **changes})


def window(seed: int = 0) -> np.ndarray:
    """(20, 16) dB features in -60..-10, floor exactly -60."""
    x = np.random.default_rng(seed).uniform(-55.0, -10.0, (20, 16)).astype(np.float32)
    x[0, 0] = -60.0
    return x


def seed(i: int):
    return tf.constant([7, i], tf.int64)


def test_real_section_validates_and_bad_values_name_the_key():
    section = real_params()["train"]["augment"]
    assert load_section({"augment": section}, "augment", AugmentParams).noise_snr_db == (5.0, 20.0)
    for key, value, match in [("noise_snr_db", [20.0, 5.0], "noise_snr_db"), ("noise_prob", 1.5, "noise_prob"),
                              ("time_masks", -1, "time_masks"), ("noise_snr_db", [1.0], "noise_snr_db")]:
        with pytest.raises(ParamsError, match=f"augment.{match}"):
            load_section({"augment": {**section, key: value}}, "augment", AugmentParams)


def test_mask_axis_floors_exactly_the_given_bins():
    x = tf.constant(window())
    out = augment.mask_axis(x, 0, start=3, width=4, value=-60.0).numpy()
    assert np.all(out[3:7] == -60.0) and np.array_equal(out[:3], window()[:3]) and np.array_equal(out[7:], window()[7:])
    out = augment.mask_axis(x, 1, start=10, width=6, value=-60.0).numpy()
    assert np.all(out[:, 10:] == -60.0) and np.array_equal(out[:, :10], window()[:, :10])


@pytest.mark.parametrize(("axis", "changes"), [(0, dict(time_masks=1, time_mask_frames=5)),
                                              (1, dict(freq_masks=1, freq_mask_bins=5))])
def test_spec_augment_masks_one_band_of_at_most_max_width_with_the_floor(axis, changes):
    widths = set()
    for i in range(30):
        out = augment.spec_augment(tf.constant(window()), seed(i), params(**changes)).numpy()
        masked = np.all(out == -60.0, axis=1 - axis)  # frames (axis 0) or bins (axis 1) entirely at the floor
        changed = np.any(out != window(), axis=1 - axis)
        assert np.array_equal(masked, changed)  # only whole, floored bands change
        idx = np.flatnonzero(masked)
        assert len(idx) <= 5 and (len(idx) == 0 or np.all(np.diff(idx) == 1))  # one contiguous band
        widths.add(len(idx))
    assert len(widths) > 2  # the width is drawn, not fixed
    again = augment.spec_augment(tf.constant(window()), seed(3), params(**changes)).numpy()
    np.testing.assert_array_equal(again, augment.spec_augment(tf.constant(window()), seed(3), params(**changes)))


def test_spec_augment_off_is_identity():
    out = augment.augment_window(tf.constant(window()), tf.constant(0), None, seed(1), params(), top_db=80.0)
    np.testing.assert_array_equal(out.numpy(), window())


def test_random_range_floors_the_window_at_its_peak_minus_a_drawn_range():
    floors = set()
    for i in range(20):
        out = augment.random_range(tf.constant(window()), seed(i), 20.0, 40.0).numpy()
        floor = out.min()
        assert -50.0 - 1e-4 <= floor <= -30.0 + 1e-4  # peak -10 dB minus 20..40 dB
        np.testing.assert_array_equal(out, np.maximum(window(), floor))  # only values below the floor change
        floors.add(round(float(floor), 3))
    assert len(floors) > 10
    np.testing.assert_array_equal(augment.random_range(tf.constant(window()), seed(3), 20.0, 40.0),
                                  augment.random_range(tf.constant(window()), seed(3), 20.0, 40.0))


def test_dynamic_range_in_the_window_transform_and_its_limit():
    p = params(dynamic_range_db=30.0)
    out = augment.augment_window(tf.constant(window()), tf.constant(0), None, seed(1), p, top_db=45.0).numpy()
    assert out.min() > -60.0 and out.min() >= out.max() - 45.0 - 1e-4  # floored between peak-45 and peak-30
    assert np.array_equal(augment.augment_window(tf.constant(window()), tf.constant(0), None, seed(1), params(),
                                                 top_db=45.0).numpy(), window())  # 0 disables
    with pytest.raises(ParamsError, match=r"dynamic_range_db=80 must be below spectrogram.top_db=80"):
        augment.window_transform(None, params(dynamic_range_db=80.0), frames=30, top_db=80.0, n_classes=3)
    with pytest.raises(ParamsError, match="augment.dynamic_range_db"):
        load_section({"augment": {**real_params()["train"]["augment"], "dynamic_range_db": -1.0}}, "augment",
                     AugmentParams)


def test_random_gain_shifts_every_value_by_one_db_amount_within_range():
    shifts = []
    for i in range(20):
        out = augment.random_gain(tf.constant(window()), seed(i), 6.0).numpy()
        shift = out - window()
        np.testing.assert_allclose(shift, shift[0, 0], atol=1e-4)
        shifts.append(shift[0, 0])
    assert max(map(abs, shifts)) <= 6.0 and np.std(shifts) > 1.0


def test_mix_noise_only_raises_power_and_hits_the_snr():
    x, noise = tf.constant(window(0)), tf.constant(window(1) - 20.0)
    out = augment.mix_noise(x, noise, tf.constant(10.0)).numpy()
    assert np.all(out >= window(0) - 1e-4)
    added = 10 ** (out / 10) - 10 ** (window(0) / 10)
    snr = 10 * np.log10(np.mean(10 ** (window(0) / 10)) / np.mean(added))
    assert snr == pytest.approx(10.0, abs=0.05)


def test_random_noise_spares_the_noise_class_and_follows_prob():
    x, noise = tf.constant(window(0)), tf.constant(window(1))
    p = params(noise_prob=1.0, noise_snr_db=(0.0, 0.0))
    assert np.array_equal(augment.random_noise(x, tf.constant(2), noise, seed(0), p, noise_label=2).numpy(), window(0))
    assert not np.array_equal(augment.random_noise(x, tf.constant(1), noise, seed(0), p, noise_label=2).numpy(),
                              window(0))
    half = params(noise_prob=0.5)
    mixed = [not np.array_equal(augment.random_noise(x, tf.constant(1), noise, seed(i), half, 2).numpy(), window(0))
             for i in range(40)]
    assert 8 < sum(mixed) < 32


def test_mixup_labels_stay_distributions_and_inputs_are_convex_mixes():
    x = tf.constant(np.stack([np.full((4, 3, 1), float(i)) for i in range(8)]), tf.float32)  # example i == i
    y = tf.one_hot(tf.range(8) % 3, 3)
    w = tf.constant(np.arange(1.0, 9.0), tf.float32)
    mx, my, mw = (t.numpy() for t in augment.mixup(x, y, w, seed(5), alpha=0.4))
    np.testing.assert_allclose(my.sum(axis=1), 1.0, atol=1e-6)
    assert mx.shape == x.shape and np.all(mx.min(axis=(1, 2, 3)) == mx.max(axis=(1, 2, 3)))
    assert np.all((mx >= 0) & (mx <= 7)) and np.all((mw >= 1) & (mw <= 8))
    assert not np.allclose(mx, x.numpy())


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        params().gain_db = 1.0  # type: ignore[misc]


def test_stretch_scales_time_length_and_keeps_mel_count():
    x = tf.constant(window())  # (20, 16)
    lengths = set()
    for i in range(20):
        out = augment.stretch(x, seed(i), 0.3, axis=0).numpy()
        assert out.shape[1] == 16 and 14 <= out.shape[0] <= 26  # 20 * [0.7, 1.3]
        lengths.add(out.shape[0])
        warped = augment.stretch(x, seed(i), 0.3, axis=1).numpy()
        assert warped.shape == (20, 16) and warped.min() >= window().min() - 1e-4
        assert warped.max() <= window().max() + 1e-4  # bilinear: no new extremes
    assert len(lengths) > 3
    np.testing.assert_array_equal(augment.stretch(x, seed(2), 0.3, 1), augment.stretch(x, seed(2), 0.3, 1))


def test_freq_warp_down_fills_the_top_bins_with_the_floor():
    x = tf.constant(np.tile(np.linspace(-50.0, -10.0, 16, dtype=np.float32), (4, 1)))  # rising with the mel bin
    shrunk = [augment.stretch(x, seed(i), 0.5, axis=1).numpy() for i in range(30)]
    narrowed = [s for s in shrunk if np.any(s[:, -1] == -50.0)]  # factor < 1: floor-padded at the top
    assert 5 < len(narrowed) < 25
    for s in narrowed:
        top = int(np.argmax(np.diff(s[0]) < 0)) + 1  # where the rising ramp drops to the floor
        assert np.all(np.diff(s[0, :top]) > 0) and np.all(s[:, top:] == -50.0) and top < 16


def test_time_stretch_and_freq_warp_run_in_the_training_transform(tmp_path):
    from audiocnn import packed

    packed.write(tmp_path, {"a": window()})
    features = packed.open_folder(tmp_path)
    p = params(time_stretch=0.2, freq_warp=0.1, time_shift=True)
    transform = augment.window_transform(features, p, frames=30, top_db=80.0, n_classes=3)
    items = tf.data.Dataset.from_tensor_slices((features.refs_of(["a"] * 8), [1] * 8, [1.0] * 8,
                                                tf.constant([[7, i] for i in range(8)], tf.int64)))
    out = list(items.map(transform).as_numpy_iterator())
    assert all(x.shape == (30, 16, 1) and y.tolist() == [0, 1, 0] for x, y, _ in out)
    assert len({x.tobytes() for x, _, _ in out}) == 8  # each seed its own stretch, shift and warp
    again = list(items.map(transform).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([x for x, _, _ in out]), np.stack([x for x, _, _ in again]))


def test_stretch_params_are_validated():
    for key in ("time_stretch", "freq_warp"):
        with pytest.raises(ParamsError, match=key):
            params(**{key: 1.0})
