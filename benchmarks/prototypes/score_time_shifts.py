"""Score the saved models of a kept benchmark workspace on their held-out speaker, with test-time time shifts.

The probe behind ``model.test_shifts`` (2026-12-07, benchmarks/RESULTS.md, "Test-time time shifts"):
evaluate and train's validation place a clip shorter than the window at its start, while training's
``train.augment.time_shift`` draws its offset anywhere in the free space. Each MLflow run of the
workspace that logged a model is scored on its held-out clips (the validation folds, else the
test folds; the split rebuilt from the manifest's folds), centre windows as ``train.val_scores``
makes them, three ways:

- as saved (short clips at the window's start);
- ``place``: the mean of the probabilities with each short clip placed at these fractions of the
  free space (0 = start, 1 = end; a data-side alternative, not in the product);
- ``shift``: the saved model wrapped in ``models.shift_average`` with these shifts in frames, what
  ``model.test_shifts`` saves.

Run: ``python benchmarks/pipeline.py <config> --seeds 42,1 --keep``, then
``PYTHONPATH=src python benchmarks/prototypes/score_time_shifts.py <kept workspace>``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from audiocnn import data, models, packed

PLACEMENTS = [(0.0,), (0.5,), (0.0, 0.5), (0.0, 0.5, 1.0), (0.0, 0.25, 0.5, 0.75, 1.0)]
SHIFTS = [(0, 5), (0, 10), (0, 20), (0, 10, 20), (0, 15, 30), (0, 20, 40), (0, 10, 20, 30), (0, 10, 20, 30, 40)]


def placed(features: packed.Packed, ids: list[str], frames: int, top_db: float, position: float) -> np.ndarray:
    """(n, frames, n_mels, 1) dB: short clips at ``position`` of the free space, silence around; long ones centred."""
    out = []
    for ref in features.refs_of(ids):
        x = np.array(features.rows(*ref), np.float32)  # (clip frames, n_mels) dB
        missing = frames - len(x)
        if missing > 0:
            before = int(round(missing * position))
            x = np.pad(x, ((before, missing - before), (0, 0)), constant_values=data.silence_db(x, top_db))
        else:
            x = data.center_crop(x, frames, top_db)
        out.append(x)
    return np.stack(out)[..., np.newaxis]


def main(workspace: Path) -> None:
    import keras

    db = sqlite3.connect(workspace / "mlflow.db")
    manifest = pd.read_csv(workspace / "dataset/ingest/manifest.csv", dtype=str, keep_default_na=False)
    features = packed.open_folder(workspace / "dataset/features")
    labels = sorted(manifest["label"].unique())

    def param(run: str, key: str) -> str:
        return db.execute("select value from params where run_uuid=? and key=?", (run, key)).fetchone()[0]

    rows = []
    for (run,) in db.execute("select run_uuid from runs order by start_time").fetchall():
        logged = db.execute("select artifact_location from logged_models where source_run_id=?", (run,)).fetchone()
        if logged is None:
            continue
        model = keras.saving.load_model(Path(logged[0].removeprefix("file://")) / "data/model.keras", safe_mode=True)
        held = json.loads(param(run, "split.val_folds").replace("'", '"')) or json.loads(
            param(run, "split.test_folds").replace("'", '"'))
        top_db, frames = float(param(run, "spectrogram.top_db")), model.input_shape[1]
        clips = manifest[manifest["fold"].isin(held)]
        y = clips["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
        ids = list(clips["id"])
        result = {"run": f"{held[0]}/seed{param(run, 'train.seed')}"}
        probs = {q: model.predict(placed(features, ids, frames, top_db, q), batch_size=256, verbose=0)
                 for q in sorted({q for qs in PLACEMENTS for q in qs})}  # (clips, classes) per placement
        for qs in PLACEMENTS:
            result[f"place {qs}"] = float((sum(probs[q] for q in qs).argmax(axis=1) == y).mean())
        start = placed(features, ids, frames, top_db, 0.0)
        for shifts in SHIFTS:
            shifted = models.shift_average(model, shifts, "shifted").predict(start, batch_size=256, verbose=0)
            result[f"shift {shifts}"] = float((shifted.argmax(axis=1) == y).mean())
        rows.append(result)
        print(json.dumps(result), flush=True)
    table = pd.DataFrame(rows).set_index("run")
    print(table.round(3).T.to_string())
    print(table.mean().round(4).to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
