"""Stage normalize: manifest clips -> mono float32 arrays at audio.sample_rate, level-normalized."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import single_blas  # noqa: F401,I001  (first: one BLAS thread, set before numpy loads)
from audiocnn import config, normalize, stage
from audiocnn.audio import AudioParams


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--source", type=Path, required=True, help="folder the manifest paths are relative to")
    p.add_argument("--manifest", type=Path, required=True, help="ingest manifest.csv")
    p.add_argument("--out", type=Path, required=True, help="output folder (clips.npy and index.csv)")
    args = p.parse_args(argv)
    params = config.read_params(args.params)
    audio = config.load_section(params, "audio", AudioParams)
    norm = config.load_section(params, "normalize", normalize.NormalizeParams)
    max_seconds = normalize.max_duration_from(params)
    normalize.run(args.source, args.manifest, args.out, audio, norm, max_seconds)


if __name__ == "__main__":
    stage.run(main)
