"""models.py: the cnn's size and input normalization, the seed network's layer stack, model_input per arch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audiocnn import fileio, packed
from audiocnn.config import ParamsError, load_section
from audiocnn.models import ModelParams, model_input

pytest.importorskip("tensorflow")
from audiocnn import models  # noqa: E402

WINDOW = (101, 64, 1)  # 1.0 s at 16 kHz, hop 160, 64 mels


def test_real_section_validates_and_bad_values_name_the_key(params):
    assert load_section(params, "model", ModelParams).arch == "cnn"
    for key, value in [("arch", "resnet"), ("dropout", 1.0), ("width", 0), ("lifter", -1), ("members", 0),
                       ("test_warps", [0.3]), ("test_warps", [0.9, 0.9]), ("test_warps", 1.1)]:
        with pytest.raises(ParamsError, match=f"model.{key}"):
            load_section({"model": {**params["model"], key: value}}, "model", ModelParams)
    with pytest.raises(ParamsError, match="model.test_warps.*cnn"):
        load_section({"model": {**params["model"], "arch": "seed", "test_warps": [1.1]}}, "model", ModelParams)


def test_cnn_size_and_output_at_the_default_width():
    model = models.build_cnn(4, WINDOW, width=32, dropout=0.3, norm_sample=np.zeros((2, 101, 64), np.float32))
    assert 100_000 <= model.count_params() <= 1_000_000
    probs = model.predict(np.random.default_rng(0).normal(-50, 10, (3, *WINDOW)).astype(np.float32), verbose=0)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Normalization", "BatchNormalization", "GlobalAveragePooling2D", "Dropout"} <= kinds


def test_band_norm_makes_the_cnn_blind_to_a_fixed_spectral_colouring():
    """With model.band_norm, adding a constant per mel band (a microphone's response) changes nothing."""
    import keras

    rng = np.random.default_rng(4)
    sample = rng.normal(-50, 10, (4, 20, 8)).astype(np.float32)
    x = rng.normal(-50, 10, (3, 20, 8, 1)).astype(np.float32)
    colour = rng.normal(0, 6, (1, 1, 8, 1)).astype(np.float32)  # dB per band, the same in every frame
    keras.utils.set_random_seed(0)
    plain = models.build_cnn(3, (20, 8, 1), width=8, dropout=0.0, norm_sample=sample)
    keras.utils.set_random_seed(0)
    banded = models.build_cnn(3, (20, 8, 1), width=8, dropout=0.0, norm_sample=sample, band_norm=True)
    np.testing.assert_allclose(banded.predict(x + colour, verbose=0), banded.predict(x, verbose=0), atol=1e-5)
    assert np.abs(plain.predict(x + colour, verbose=0) - plain.predict(x, verbose=0)).max() > 1e-4
    assert models.build(load_section({"model": {"arch": "cnn", "width": 8, "dropout": 0.0, "band_norm": True,
                                                "lifter": 0, "members": 1, "test_warps": [], "test_stretches": [],
                                                "test_shifts": []}},
                                     "model", ModelParams), 3, (20, 8, 1), sample).get_layer("band_mean")


def test_lifter_keeps_the_spectral_envelope_and_drops_the_harmonic_ripple():
    """lifter_matrix: a smooth frame passes, a fast ripple across the mel axis (pitch harmonics) is removed."""
    n_mels, keep = 40, 12
    smooth = models.lifter_matrix(n_mels, keep)
    bands = np.arange(n_mels)
    envelope = -40.0 + 15.0 * np.cos(np.pi * 2 * (bands + 0.5) / n_mels)  # DCT coefficient 2: kept
    ripple = 6.0 * np.cos(np.pi * 30 * (bands + 0.5) / n_mels)  # DCT coefficient 30: dropped
    np.testing.assert_allclose(envelope @ smooth, envelope, atol=1e-4)
    np.testing.assert_allclose((envelope + ripple) @ smooth, envelope, atol=1e-4)
    np.testing.assert_allclose(smooth, smooth.T, atol=1e-6)
    np.testing.assert_allclose(models.lifter_matrix(n_mels, n_mels), np.eye(n_mels), atol=1e-5)


def test_lifter_in_the_cnn_is_fixed_and_makes_it_blind_to_the_ripple(tmp_path):
    import keras

    rng = np.random.default_rng(5)
    sample = rng.normal(-50, 10, (4, 20, 16)).astype(np.float32)
    x = rng.normal(-50, 10, (3, 20, 16, 1)).astype(np.float32)
    ripple = (6.0 * np.cos(np.pi * 14 * (np.arange(16) + 0.5) / 16)).reshape(1, 1, 16, 1).astype(np.float32)
    params = load_section({"model": {"arch": "cnn", "width": 8, "dropout": 0.0, "band_norm": False, "lifter": 6,
                                    "members": 1, "test_warps": [], "test_stretches": [], "test_shifts": []}},
                          "model", ModelParams)
    model = models.build(params, 3, (20, 16, 1), sample)
    np.testing.assert_allclose(model.predict(x + ripple, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert not model.get_layer("lifter").trainable
    plain = models.build(ModelParams("cnn", 8, 0.0, False, 0, 1), 3, (20, 16, 1), sample)
    assert "lifter" not in {layer.name for layer in plain.layers}  # 0: off
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.get_layer("lifter").get_weights()[0], models.lifter_matrix(16, 6))


def test_cnn_normalization_is_adapted_per_mel_inside_the_model():
    import keras

    rng = np.random.default_rng(1)
    sample = (rng.normal(0, 3, (16, 20, 8)) + np.linspace(-70, -20, 8)).astype(np.float32)  # (n, frames, mels) dB
    model = models.build_cnn(2, (20, 8, 1), width=8, dropout=0.0, norm_sample=sample)
    normalized = keras.Model(model.input, model.get_layer("normalize").output)(sample[..., None]).numpy()
    np.testing.assert_allclose(normalized.mean(axis=(0, 1, 3)), 0.0, atol=1e-3)  # per mel bin
    np.testing.assert_allclose(normalized.std(axis=(0, 1, 3)), 1.0, atol=1e-2)


def test_cnn_accepts_small_inputs():
    model = models.build_cnn(3, (9, 8, 1), width=4, dropout=0.1, norm_sample=np.zeros((1, 9, 8), np.float32))
    assert model.predict(np.zeros((2, 9, 8, 1), np.float32), verbose=0).shape == (2, 3)


def test_seed_is_the_notebook_network():
    model = models.build(ModelParams(arch="seed", width=32, dropout=0.3, band_norm=False, lifter=0, members=1), 10, (224, 224, 3))
    stack = [(type(layer).__name__, getattr(layer, "filters", None) or getattr(layer, "units", None))
             for layer in model.layers[1:]]
    assert stack == [("Conv2D", 32), ("MaxPooling2D", None), ("Conv2D", 128), ("MaxPooling2D", None),
                     ("Conv2D", 128), ("MaxPooling2D", None), ("Conv2D", 128), ("MaxPooling2D", None),
                     ("Flatten", None), ("Dense", 1024), ("Dense", 10)]
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 10)
    assert all(layer.kernel_size == (3, 3) for layer in model.layers if type(layer).__name__ == "Conv2D")


def test_model_input_per_arch(tmp_path):
    x = np.linspace(-80, -20, 250 * 64, dtype=np.float32).reshape(250, 64)
    packed.write(tmp_path, {"clip-1": x})
    (tmp_path / "img" / "dog").mkdir(parents=True)
    Image.fromarray(np.full((224, 224, 3), 255, np.uint8)).save(tmp_path / "img" / "dog" / "clip-1.png")
    row = {"id": "clip-1", "image": "dog/clip-1.png"}
    windows = model_input("cnn", row, features_dir=tmp_path, images_dir=tmp_path / "img", window_frames=101,
                          hop_frames=50, top_db=80.0)
    assert windows.shape == (4, 101, 64, 1)  # starts 0, 50, 100 and the end-aligned 149
    np.testing.assert_array_equal(windows[-1, -1, :, 0], x[-1])
    image = model_input("seed", row, features_dir=tmp_path, images_dir=tmp_path / "img", window_frames=101,
                        hop_frames=50, top_db=80.0)
    assert image.shape == (1, 224, 224, 3) and image.max() == 1.0


def test_an_ensemble_averages_its_networks_and_reloads(tmp_path):
    import keras

    rng = np.random.default_rng(3)
    sample = rng.normal(-50, 10, (4, 20, 16)).astype(np.float32)
    x = rng.normal(-50, 10, (5, 20, 16, 1)).astype(np.float32)
    params = ModelParams("cnn", 8, 0.0, True, 0, 3)
    nets = []
    for k in range(3):
        keras.utils.set_random_seed(k)
        nets.append(models.build(params, 3, (20, 16, 1), sample, name=models.member_name(k)))
    model = models.ensemble(nets, "cnn_ensemble")
    assert model.count_params() == 3 * nets[0].count_params() and model.output_shape == (None, 3)
    assert [model.get_layer(f"member{k}") for k in range(3)] == nets
    first_kernels = [net.get_layer("stem_conv").get_weights()[0] for net in nets]
    assert not np.allclose(first_kernels[0], first_kernels[1])  # each from its own initial weights
    each = np.stack([net.predict(x, verbose=0) for net in nets], axis=1)  # (5, members, classes)
    np.testing.assert_allclose(model.predict(x, verbose=0), each.mean(axis=1), atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), each.mean(axis=1), atol=1e-6)


def assert_fixed_view_average(model, net, x, each, tmp_path) -> None:
    """``model`` is ``net`` averaged over fixed views of its input: on ``x`` it outputs the mean of ``each``
    (``net``'s outputs on every view), has ``net``'s shapes and only ``net``'s trainable weights (the views
    are fixed), and reloads in safe mode to the same output."""
    import keras

    np.testing.assert_allclose(model.predict(x, verbose=0), np.mean(each, axis=0), atol=1e-5)
    assert model.input_shape == net.input_shape and model.output_shape == net.output_shape
    assert [w.shape for w in model.trainable_weights] == [w.shape for w in net.trainable_weights]
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.mean(each, axis=0), atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 2.0])
def test_warp_matrix_is_the_training_frequency_warp(factor):
    """frame @ kernel + fill * floor equals augment.scale_axis (training's freq_warp) at that factor."""
    import tensorflow as tf

    from audiocnn import augment

    x = np.random.default_rng(6).normal(-50, 10, (20, 40)).astype(np.float32)  # (frames, n_mels) dB
    kernel, fill = models.warp_matrix(40, factor)
    expected = augment.scale_axis(tf.constant(x), factor, 1).numpy()
    np.testing.assert_allclose(x @ kernel + fill * x.min(), expected, atol=1e-4)
    assert fill.any() == (factor < 1.0)  # a shrinking warp leaves the top bins to the floor


@pytest.mark.parametrize("factor", [0.5, 0.9, 0.95, 1.05, 1.1, 2.0])
def test_warp_matrix_on_the_time_axis_is_the_training_time_stretch(factor):
    """On a window's time axis the same matrix is augment.scale_axis(axis 0), cut or floor-filled to the window."""
    import tensorflow as tf

    from audiocnn import augment

    x = np.random.default_rng(8).normal(-50, 10, (30, 12)).astype(np.float32)  # (frames, n_mels) dB
    kernel, fill = models.warp_matrix(30, factor)
    stretched = augment.scale_axis(tf.constant(x), factor, 0).numpy()  # (round(30 * factor), n_mels)
    expected = np.concatenate([stretched, np.full((30, 12), x.min(), np.float32)])[:30]
    np.testing.assert_allclose((x.T @ kernel + fill * x.min()).T, expected, atol=1e-4)


def test_stretch_average_means_the_network_over_stretched_windows_around_each_warp(tmp_path):
    import tensorflow as tf

    from audiocnn import augment

    rng = np.random.default_rng(9)
    sample = rng.normal(-50, 10, (4, 20, 16)).astype(np.float32)
    x = rng.normal(-50, 10, (5, 20, 16, 1)).astype(np.float32)
    net = models.build(ModelParams("cnn", 8, 0.0, True, 0, 1), 3, (20, 16, 1), sample)

    def scaled(window, factor, axis):  # (frames, n_mels) -> the same shape, as the model's fixed layers scale it
        y = augment.scale_axis(tf.constant(window), factor, axis).numpy()
        if axis == 1:
            return y
        return np.concatenate([y, np.full(window.shape, window.min(), np.float32)])[:window.shape[0]]

    stretches, warps = (0.9, 1.0, 1.1), (0.95, 1.05)
    model = models.stretch_average(models.warp_average(net, warps, "w"), stretches, "cnn_stretched")
    each = [net.predict(np.stack([scaled(scaled(w[..., 0], s, 0), f, 1) for w in x])[..., None], verbose=0)
            for s in stretches for f in warps]
    assert not np.allclose(each[0], each[2], atol=1e-4)  # the stretches do change what the network sees
    assert_fixed_view_average(model, net, x, each, tmp_path)


@pytest.mark.parametrize("shift", [0, 1, 7, 29])
def test_shift_matrix_moves_the_window_later_with_the_floor_in_front(shift):
    x = np.random.default_rng(10).normal(-50, 10, (30, 12)).astype(np.float32)  # (frames, n_mels) dB
    kernel, fill = models.shift_matrix(30, shift)
    expected = np.concatenate([np.full((shift, 12), x.min(), np.float32), x[: 30 - shift]])
    np.testing.assert_allclose((x.T @ kernel + fill * x.min()).T, expected, atol=1e-6)
    with pytest.raises(ValueError, match="shift=30 frames must be within 0..29"):
        models.shift_matrix(30, 30)


def test_shift_average_means_the_network_over_shifted_windows_around_each_stretch(tmp_path):
    import tensorflow as tf

    from audiocnn import augment

    rng = np.random.default_rng(11)
    sample = rng.normal(-50, 10, (4, 20, 16)).astype(np.float32)
    x = rng.normal(-50, 10, (5, 20, 16, 1)).astype(np.float32)
    net = models.build(ModelParams("cnn", 8, 0.0, True, 0, 1), 3, (20, 16, 1), sample)

    def moved(window, shift):  # (frames, n_mels): ``shift`` frames later, the window's floor in front
        front = np.full((shift, window.shape[1]), window.min(), np.float32)
        return np.concatenate([front, window[: len(window) - shift]])

    def stretched(window, factor):  # training's time stretch, cut or floor-filled to the window
        y = augment.scale_axis(tf.constant(window), factor, 0).numpy()
        return np.concatenate([y, np.full(window.shape, window.min(), np.float32)])[: len(window)]

    shifts, stretches = (0, 3, 6), (0.9, 1.1)
    model = models.shift_average(models.stretch_average(net, stretches, "s"), shifts, "cnn_shifted")
    each = [net.predict(np.stack([stretched(moved(w[..., 0], k), f) for w in x])[..., None], verbose=0)
            for k in shifts for f in stretches]
    assert not np.allclose(each[0], each[4], atol=1e-4)  # the shifts do change what the network sees
    assert_fixed_view_average(model, net, x, each, tmp_path)


@pytest.mark.parametrize("shifts, message", [([-0.1], "within 0..60 s"), ([0.1, 0.1], "must not repeat")])
def test_test_shifts_are_checked(shifts, message):
    with pytest.raises(ParamsError, match=f"test_shifts.*{message}"):
        ModelParams("cnn", 8, 0.0, False, 0, 1, test_shifts=tuple(shifts))
    with pytest.raises(ParamsError, match="test_shifts.*needs model.arch cnn"):
        ModelParams("seed", 8, 0.0, False, 0, 1, test_shifts=(0.0,))


@pytest.mark.parametrize("key", ["test_warps", "test_stretches"])
@pytest.mark.parametrize("factors, message", [([0.4], "within 0.5..2.0"), ([1.0, 1.0], "must not repeat")])
def test_test_time_factors_are_checked(key, factors, message):
    with pytest.raises(ParamsError, match=f"{key}.*{message}"):
        ModelParams("cnn", 8, 0.0, False, 0, 1, **{key: tuple(factors)})
    with pytest.raises(ParamsError, match=f"{key}.*needs model.arch cnn"):
        ModelParams("seed", 8, 0.0, False, 0, 1, **{key: (1.0,)})


def test_warp_average_means_the_network_over_warped_windows_and_reloads(tmp_path):
    import tensorflow as tf

    from audiocnn import augment

    rng = np.random.default_rng(7)
    sample = rng.normal(-50, 10, (4, 20, 16)).astype(np.float32)
    x = rng.normal(-50, 10, (5, 20, 16, 1)).astype(np.float32)
    net = models.build(ModelParams("cnn", 8, 0.0, True, 0, 1), 3, (20, 16, 1), sample)
    warps = (0.9, 1.0, 1.1)
    model = models.warp_average(net, warps, "cnn_warped")
    each = [net.predict(np.stack([augment.scale_axis(tf.constant(w[..., 0]), f, 1).numpy() for w in x])[..., None],
                        verbose=0) for f in warps]
    assert not np.allclose(each[0], each[1], atol=1e-4)  # the warps do change what the network sees
    assert_fixed_view_average(model, net, x, each, tmp_path)
