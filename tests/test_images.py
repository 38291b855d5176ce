"""images: label slugs, the numpy+PIL renderer (size, orientation, colours), the gallery."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from audiocnn import images
from audiocnn.colormap import MAGMA


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


def test_magma_table_matches_matplotlib():
    assert MAGMA.shape == (256, 3) and MAGMA.dtype == np.uint8 and not MAGMA.flags.writeable
    np.testing.assert_array_equal(MAGMA, np.rint(colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255))


def test_render_size_orientation_and_colour():
    db = np.full((50, 64), -60.0, np.float32)  # (frames, n_mels): 20 dB below the top everywhere...
    db[:, :8] = -40.0  # ...except the 8 lowest mel bands, at the clip maximum
    rgb = images.render(db, top_db=80.0, size=48)
    assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
    lut = MAGMA
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
    assert np.all(rgb == MAGMA[0])


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


def test_gallery_places_each_panel_and_the_colour_bar():
    """Row = class (sorted), column = clip; each panel is render_rect of its clip at GALLERY_PANEL pixels."""
    rng = np.random.default_rng(4)
    quiet, loud = rng.uniform(-80, -40, (60, 40)).astype(np.float32), rng.uniform(-20, 0, (30, 40)).astype(np.float32)
    panels = [("zebra", "z-1", loud), ("ant", "a-1", quiet), ("ant", "a-2", loud)]
    with Image.open(io.BytesIO(images.gallery_png(panels, 2, 8000, 80, 20.0, 4000.0, 40.0))) as image:
        pixels = np.asarray(image.convert("RGB"))  # (height, width, 3)
    width, height = images.GALLERY_PANEL
    expected = {key: images.render_rect(db, 40.0, width, height) for key, db in (("quiet", quiet), ("loud", loud))}

    def found(rgb):  # (y, x) of every exact occurrence of rgb's top-left 8 x 8 block, scanning the canvas
        block = rgb[:8, :8]
        return [(y, x) for y, x in zip(*np.nonzero(np.all(pixels[:, :, None] == block[0, 0], axis=-1)[..., 0]))
                if np.array_equal(pixels[y:y + 8, x:x + 8], block)
                and np.array_equal(pixels[y:y + height, x:x + width], rgb)]

    (quiet_at,), loud_at = found(expected["quiet"]), sorted(found(expected["loud"]))
    assert len(loud_at) == 2
    ant_2, zebra_1 = loud_at  # ant's row first, zebra's below it, each clip in full
    assert ant_2[0] == quiet_at[0] and ant_2[1] > quiet_at[1]  # a-2 right of a-1 in the ant row
    assert zebra_1[0] > quiet_at[0] and zebra_1[1] == quiet_at[1]  # z-1 under a-1, in column one
    bar_top = np.all(pixels == MAGMA[-1], axis=-1)  # the bar's 0 dB end; the clips' tops are not this exact colour
    bar_bottom = np.all(pixels == MAGMA[0], axis=-1)
    assert bar_top.any() and bar_bottom.any() and np.nonzero(bar_top)[0].min() < np.nonzero(bar_bottom)[0].min()


def test_gallery_of_long_names_and_one_class_keeps_to_its_grid():
    db = np.random.default_rng(5).uniform(-80, 0, (20, 16)).astype(np.float32)
    panels = [("x" * 200, "id-" + "y" * 200, db)]
    with Image.open(io.BytesIO(images.gallery_png(panels, 4, 16000, 160, 20.0, 8000.0, 80.0))) as image:
        one_column = image.size
    with Image.open(io.BytesIO(images.gallery_png(panels * 2, 4, 16000, 160, 20.0, 8000.0, 80.0))) as image:
        two_columns = image.size
    assert two_columns[1] == one_column[1] and two_columns[0] > one_column[0]  # width follows the clips per class


@pytest.mark.parametrize("seconds, ticks", [(1.6, [0.0, 0.5, 1.0, 1.5]), (3.0, [0.0, 1.0, 2.0, 3.0]),
                                            (0.3, [0.0, 0.1, 0.2, 0.3]), (25.0, [0.0, 10.0, 20.0]),
                                            (0.0, [0.0])])
def test_time_ticks_are_round_and_few(seconds, ticks):
    assert images._time_ticks(seconds) == ticks


def test_gallery_needs_no_matplotlib():
    """matplotlib's import alone was 0.35 s of the spectrogram stage; the gallery only borrows its font file."""
    script = ("import sys, numpy as np; from audiocnn import images; "
              "db = np.zeros((10, 8), np.float32); "
              "images.gallery_png([('a', 'a-1', db)], 1, 16000, 160, 0.0, 8000.0, 80.0); "
              "images.render(db, 80.0, 8); print('matplotlib' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
