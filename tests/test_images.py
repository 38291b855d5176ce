"""images: label slugs, the numpy+PIL renderer (size, orientation, colours), the gallery."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from audiocnn import images


def test_slug_keeps_safe_labels():
    assert images.label_slug("chainsaw") == "chainsaw"
    assert images.label_slug("dog_bark-2.0") == "dog_bark-2.0"
    assert images.label_slug("Dog bark") == "dog-bark-fb90e6c2"


@pytest.mark.parametrize("label", ["Dog", "dog bark", "dog/bark", 'say "hi"', "dög", "  ", "..", "日本語", "a" * 300,
                                   "tab\there", "con", "-x-"])
def test_slug_is_safe(label):
    slug = images.label_slug(label)
    assert re.fullmatch(r"[a-z0-9._-]+", slug) and slug not in {".", ".."} and len(slug) <= 64
    assert slug == images.label_slug(label)  # stable


def test_slugs_are_unique_per_label():
    labels = ["dog", "Dog", "DOG", "dog bark", "dog-bark", "dog/bark", "dog\\bark", "dög", "日本", "中文", "", " "]
    assert len({images.label_slug(label) for label in labels}) == len(labels)


def test_magma_lut_matches_matplotlib():
    lut = images.magma_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[[0, 128, 255]], np.rint(colormaps["magma"]([0.0, 128 / 255, 1.0])[:, :3] * 255))


def test_render_size_orientation_and_colour():
    db = np.full((50, 64), -60.0, np.float32)  # (frames, n_mels): 20 dB below the top everywhere...
    db[:, :8] = -40.0  # ...except the 8 lowest mel bands, at the clip maximum
    rgb = images.render(db, top_db=80.0, size=48)
    assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
    lut = images.magma_lut()
    np.testing.assert_array_equal(rgb[-1, 10], lut[255])  # low frequencies at the bottom, brightest colour
    np.testing.assert_array_equal(rgb[0, 10], lut[191])  # -20 dB of an 80 dB range: 3/4 of the scale
    assert rgb[:24].astype(int).sum() < rgb[-4:].astype(int).sum() * 6


def test_png_bytes_decodes_to_the_same_pixels(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (17, 29, 3), dtype=np.uint8)  # height != width
    (tmp_path / "x.png").write_bytes(images.png_bytes(rgb))
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode == "RGB" and image.size == (29, 17)
        np.testing.assert_array_equal(np.asarray(image), rgb)


def test_render_scales_to_clip_top():
    quiet = np.random.default_rng(1).uniform(-90, -10, (30, 16)).astype(np.float32)
    np.testing.assert_array_equal(images.render(quiet, 80.0, 20), images.render(quiet + 35.0, 80.0, 20))


def test_render_silence_is_black():
    rgb = images.render(np.full((10, 16), -100.0, np.float32), 80.0, 16)
    assert np.all(rgb == images.magma_lut()[0])


def test_write_image_and_gallery(tmp_path):
    db = np.random.default_rng(2).uniform(-80, 0, (40, 32)).astype(np.float32)
    images.write_image(tmp_path / "x" / "c.png", db, 80.0, 24)
    with Image.open(tmp_path / "x" / "c.png") as image:
        assert image.mode == "RGB" and image.size == (24, 24)
        np.testing.assert_array_equal(np.asarray(image), images.render(db, 80.0, 24))
    panels = [("b", "b-1", db), ("a", "a-1", db), ("a", "a-2", db[:20])]
    images.write_gallery(tmp_path / "g.png", panels, 2, 16000, 160, 20.0, 8000.0, 80.0)
    with Image.open(tmp_path / "g.png") as gallery:
        width, height = gallery.size
    assert width > 400 and height > 300
