"""Stage train: split features (or images, model.arch seed) -> a trained Keras model, metrics and curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, stage, train
from audiocnn.audio import AudioParams
from audiocnn.models import ModelParams
from audiocnn.normalize import NormalizeParams
from audiocnn.spectrogram import SpectrogramParams, check_against_audio


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--features", type=Path, required=True, help="spectrogram output (features.npy, index.csv)")
    p.add_argument("--images", type=Path, required=True, help="per-clip PNGs (model.arch seed)")
    p.add_argument("--split", type=Path, required=True, help="split output (train.csv, val.csv, test.csv)")
    p.add_argument("--model", type=Path, required=True, help="output folder: model.keras, labels/preprocess/run.json")
    p.add_argument("--metrics", type=Path, required=True, help="output JSON: best epoch, val loss/accuracy, speed")
    p.add_argument("--history", type=Path, required=True, help="output CSV: per-epoch loss, accuracy, lr")
    p.add_argument("--curves", type=Path, required=True, help="output PNG: training curves")
    args = p.parse_args(argv)
    params = config.read_params(args.params)
    audio = config.load_section(params, "audio", AudioParams)
    spec = config.load_section(params, "spectrogram", SpectrogramParams)
    check_against_audio(spec, audio)
    normalize = config.load_section(params, "normalize", NormalizeParams)
    model = config.load_section(params, "model", ModelParams)
    settings = config.load_section(params, "train", train.TrainParams)
    paths = train.TrainPaths(args.features, args.images, args.split, args.model, args.metrics, args.history,
                             args.curves)
    train.train(paths, params, audio, normalize, spec, model, settings)


if __name__ == "__main__":
    stage.run(main)
