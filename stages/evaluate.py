"""Stage evaluate: the trained model on the test split -> metrics/eval.json, reports/eval, MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, evaluate, stage
from audiocnn.audio import AudioParams
from audiocnn.models import ModelParams
from audiocnn.spectrogram import SpectrogramParams
from audiocnn.train import TrainParams


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--features", type=Path, required=True, help="spectrogram output (features.npy, index.csv)")
    p.add_argument("--images", type=Path, required=True, help="spectrogram PNGs (model.arch seed)")
    p.add_argument("--split", type=Path, required=True, help="folder with test.csv")
    p.add_argument("--model", type=Path, required=True, help="train output: model.keras, labels.json, run.json")
    p.add_argument("--metrics", type=Path, required=True, help="output JSON of the test metrics")
    p.add_argument("--reports", type=Path, required=True, help="output folder: confusion, mistakes, report.md")
    args = p.parse_args(argv)
    params = config.read_params(args.params)
    audio = config.load_section(params, "audio", AudioParams)
    spec = config.load_section(params, "spectrogram", SpectrogramParams)
    model = config.load_section(params, "model", ModelParams)
    train = config.load_section(params, "train", TrainParams)
    evaluate.run(features_dir=args.features, images_dir=args.images, split_dir=args.split, model_dir=args.model,
                 metrics_path=args.metrics, reports_dir=args.reports, arch=model.arch,
                 window_seconds=train.window_seconds, sample_rate=audio.sample_rate, spectrogram=spec,
                 params=config.load_section(params, "evaluate", evaluate.EvaluateParams), all_params=params)


if __name__ == "__main__":
    stage.run(main)
