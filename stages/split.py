"""Stage split: the features index -> train/val/test manifests and split metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, split, stage


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--features", type=Path, required=True, help="spectrogram output folder (index.csv)")
    p.add_argument("--out", type=Path, required=True, help="output folder for train.csv, val.csv, test.csv")
    p.add_argument("--metrics", type=Path, required=True, help="output JSON: clips per split and class")
    args = p.parse_args(argv)
    params = config.load(args.params, "split", split.SplitParams)
    split.run(args.features, args.out, args.metrics, params)


if __name__ == "__main__":
    stage.run(main)
