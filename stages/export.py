"""Stage export: models/model.keras -> waveform-input SavedModel, TFLite float32 and int8, export.json (parity)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, export, stage
from audiocnn.evaluate import EvaluateParams


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="train output: model.keras, labels.json, preprocess.json")
    p.add_argument("--normalized", type=Path, required=True, help="normalize output: clips.npy waveforms, index.csv")
    p.add_argument("--features", type=Path, required=True, help="spectrogram output: evaluate's inputs (the reference)")
    p.add_argument("--split", type=Path, required=True,
                   help="folder with train.csv (int8 calibration) and test.csv (parity)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: model.tflite, model_int8.tflite, frontend.tflite, saved_model/, export.json")
    p.add_argument("--metrics", type=Path, required=True, help="output JSON: parity figures and sizes (dvc metrics)")
    args = p.parse_args(argv)
    params = config.read_params(args.params)
    settings = config.load_section(params, "export", export.ExportParams)
    evaluate = config.load_section(params, "evaluate", EvaluateParams)
    export.run(model_dir=args.model, normalized=args.normalized, split=args.split, features=args.features,
               out=args.out, params=settings, hop_seconds=evaluate.hop_seconds, batch_size=evaluate.batch_size,
               metrics=args.metrics)


if __name__ == "__main__":
    stage.run(main)
