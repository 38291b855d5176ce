"""Stage spectrogram: normalized clips -> log-mel features, per-clip PNGs and the class gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import single_blas  # noqa: F401,I001  (first: one BLAS thread, set before numpy loads)
from audiocnn import config, spectrogram, stage
from audiocnn.audio import AudioParams


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--normalized", type=Path, required=True, help="normalize output (clips.npy, index.csv)")
    p.add_argument("--features", type=Path, required=True, help="output folder for arrays, index.csv, meta.json")
    p.add_argument("--images", type=Path, required=True, help="output folder for the per-clip PNGs")
    p.add_argument("--gallery", type=Path, required=True, help="output PNG: examples of every class")
    args = p.parse_args(argv)
    params = config.read_params(args.params)
    audio = config.load_section(params, "audio", AudioParams)
    spec = config.load_section(params, "spectrogram", spectrogram.SpectrogramParams)
    spectrogram.check_against_audio(spec, audio)
    spectrogram.run(args.normalized, args.features, args.images, args.gallery, audio, spec)


if __name__ == "__main__":
    stage.run(main)
