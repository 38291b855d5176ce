"""Spectrogram pictures for people (and the seed model): per-clip PNGs and the class gallery.

Per-clip images are rendered with numpy + PIL (a magma lookup table, one nearest-neighbour
enlargement, a minimal PNG encoder), not with a matplotlib figure per clip, which is far
slower. Each image spans [clip max - top_db, clip max] dB so clips are comparable.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from audiocnn import fileio

FLOOR_DB = -100.0  # power_to_db of a zero (amin=1e-10): rendered black, even in a silent clip
SLUG_MAX = 48  # characters kept from the label before the hash
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def label_slug(label: str) -> str:
    """A filesystem-safe folder name for ``label``, unique per label.

    Lowercase ASCII letters, digits, '.', '_' and '-'; when that changes the label
    (case, accents, spaces, slashes, quotes, length), an 8-hex hash of the label is
    appended so two labels never share a folder: ``"Dog bark" -> "dog-bark-fb90e6c2"``.
    """
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower()).strip("-.")[:SLUG_MAX].strip("-.")
    if slug == label:
        return slug
    digest = hashlib.sha1(label.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"label-{digest}"


@functools.lru_cache(maxsize=1)
def magma_lut() -> np.ndarray:
    """(256, 3) uint8: matplotlib's magma colour map, read once per process."""
    from matplotlib import colormaps

    rgba = colormaps["magma"](np.linspace(0.0, 1.0, 256))  # (256, 4) float in [0, 1]
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


def render(db: np.ndarray, top_db: float, size: int) -> np.ndarray:
    """(frames, n_mels) dB -> (size, size, 3) uint8 RGB, time left to right, low frequencies at the bottom.

    Bands and frames are drawn as flat blocks (nearest neighbour, as specshow draws
    them); an axis longer than ``size`` is first box-averaged down to ``size``.
    Colour-mapping the small field and then enlarging it is exact with nearest
    neighbour, cheap, and leaves runs that PNG compresses fast and small.
    """
    top = float(db.max())
    level = np.where(db > FLOOR_DB, (db - (top - top_db)) / top_db, 0.0)  # (frames, n_mels) in ~[0, 1]
    field = np.ascontiguousarray(np.clip(level, 0.0, 1.0).T[::-1], dtype=np.float32)  # (n_mels, frames), top band first
    rows, cols = min(field.shape[0], size), min(field.shape[1], size)
    if (rows, cols) != field.shape:
        field = np.asarray(Image.fromarray(field).resize((cols, rows), Image.Resampling.BOX))  # (rows, cols)
    small = np.take(magma_lut(), np.rint(np.clip(field, 0.0, 1.0) * 255).astype(np.uint8), axis=0)  # (rows, cols, 3)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST))  # (size, size, 3)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(height, width, 3) uint8 -> a PNG file: no row filter, zlib level 1.

    Several times faster than PIL's encoder (whose adaptive row filters dominate the
    per-clip cost), and as small on these block images.
    """
    height, width, _ = rgb.shape
    raw = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # filter byte 0 (none), then the row
    raw[:, 1:] = rgb.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join([PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(raw, 1)),
                     _png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_END = _png_chunk(b"IEND", b"")  # the 12 bytes every complete PNG ends with


def is_complete_png(data: bytes) -> bool:
    """Whether ``data`` starts with the PNG signature and ends with the IEND chunk (not truncated)."""
    return data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)


def write_image(path: Path, db: np.ndarray, top_db: float, size: int) -> None:
    """Render ``db`` (frames, n_mels) and save it as an RGB PNG, atomically."""
    data = png_bytes(render(db, top_db, size))
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_gallery(path: Path, panels: Sequence[tuple[str, str, np.ndarray]], per_class: int, sample_rate: int,
                  hop_length: int, fmin: float, fmax: float, top_db: float) -> None:
    """``gallery_png`` written to ``path`` atomically."""
    data = gallery_png(panels, per_class, sample_rate, hop_length, fmin, fmax, top_db)
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def gallery_png(panels: Sequence[tuple[str, str, np.ndarray]], per_class: int, sample_rate: int,
                hop_length: int, fmin: float, fmax: float, top_db: float) -> bytes:
    """A PNG grid of log-mel spectrograms, one row per class: ``panels`` = (label, id, db (frames, n_mels)).

    Plain ``imshow`` panels with a fixed layout and few tick marks: specshow's mel axis,
    constrained layout and default ticks took seconds for a 10 x 4 grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = sorted({label for label, _, _ in panels})
    columns = max(1, min(per_class, max(sum(1 for p in panels if p[0] == lab) for lab in labels)))
    figure = Figure(figsize=(2.6 * columns + 1.4, 1.9 * len(labels) + 0.9), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(labels), columns, squeeze=False)
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=0.9 / width, right=1 - 1.1 / width, top=1 - 0.75 / height, bottom=0.45 / height,
                           wspace=0.25, hspace=0.65)
    for ax in axes.flat:
        ax.set_axis_off()
    image = None
    ticks_hz, positions = _mel_ticks(n_mels_of(panels), fmin, fmax)
    for row, label in enumerate(labels):
        clips = [(clip_id, db) for lab, clip_id, db in panels if lab == label][:columns]
        for col, (clip_id, db) in enumerate(clips):
            ax = axes[row, col]
            ax.set_axis_on()
            frames, n_mels = db.shape
            image = ax.imshow((db - db.max()).T, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                              vmin=-top_db, vmax=0.0, extent=(0.0, frames * hop_length / sample_rate, 0.0, n_mels))
            # few ticks: tick artists are most of the drawing time; the mel axis is labelled once per row
            ax.xaxis.set_major_locator(MaxNLocator(3))
            if col == 0:
                ax.set_yticks(positions, [f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}" for hz in ticks_hz])
                ax.set_ylabel("mel frequency (Hz)", fontsize=8)
            else:
                ax.set_yticks([])
            ax.set_title(f"{label}  ({clip_id})", fontsize=8)
            ax.set_xlabel("time (s)" if row == len(labels) - 1 else "", fontsize=8)
            ax.tick_params(labelsize=7)
    if image is not None:
        bar = figure.add_axes((1 - 0.85 / width, 0.3, 0.12 / width, 0.4))
        figure.colorbar(image, cax=bar, label="dB re clip maximum")
    figure.suptitle("Log-mel spectrograms: the first clips of each class", y=1 - 0.2 / height, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def n_mels_of(panels: Sequence[tuple[str, str, np.ndarray]]) -> int:
    return panels[0][2].shape[1] if panels else 1


def _mel_ticks(n_mels: int, fmin: float, fmax: float) -> tuple[list[float], np.ndarray]:
    """Round frequencies (Hz) inside [fmin, fmax] and their positions on a 0..n_mels band axis."""
    from audiocnn.melspec import mel_frequencies

    centres = mel_frequencies(n_mels + 2, fmin, fmax)[1:-1]  # (n_mels,) Hz, the filterbank's band centres
    ticks, positions = [], []
    for hz in (16000, 8000, 4000, 2000, 1000, 500, 250, 100):  # top down, at least n_mels/8 bands apart
        position = float(np.interp(hz, centres, np.arange(n_mels) + 0.5))
        if fmin <= hz <= fmax and all(p - position >= n_mels / 8 for p in positions):
            ticks.append(hz)
            positions.append(position)
    return ticks, np.array(positions)
