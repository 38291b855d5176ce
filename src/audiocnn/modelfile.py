"""The ``models`` out of the train stage: model.keras, labels.json, preprocess.json, byte-reproducible.

Keras stamps the save time into model.keras (zip member dates, ``date_saved`` in metadata.json)
and memory addresses (``shared_object_id`` in config.json, the ``id()`` of objects that layers
share); here the dates are fixed and the ids renumbered 1, 2, ... in order of appearance (the
sharing is kept), and nothing run-specific (such as the MLflow run id) goes into the folder,
so the same weights give the same bytes and the same ``models`` hash in dvc.lock. Evaluate finds
the training's MLflow run by its tag ``model_sha256`` instead of a file in this folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audiocnn import fileio

if TYPE_CHECKING:
    import keras

KERAS_SAVE_DATE = "1980-01-01@00:00:00"  # metadata.json date_saved in model.keras


def write_model_dir(model_dir: Path, model: "keras.Model", labels: list[str], preprocess: dict,
                    run_id: str | None = None) -> str:
    """models/: model.keras (byte-reproducible), labels.json, preprocess.json; returns model.keras's sha256.

    Nothing run-specific goes here, so equal weights give an equal ``models`` out hash in dvc.lock.
    ``run_id`` is ignored (it was models/run.json; evaluate now finds the run by tag ``model_sha256``).
    """
    fileio.fresh_dir(model_dir)
    save_model(model, model_dir / "model.keras")
    fileio.write_json(model_dir / "labels.json", {"labels": labels})
    fileio.write_json(model_dir / "preprocess.json", preprocess)
    return fileio.sha256_file(model_dir / "model.keras")


def save_model(model: "keras.Model", path: Path) -> None:
    """``model.save`` to ``path`` atomically, then fixed zip timestamps and save date: same weights, same bytes."""
    def fixed_date(name: str, data: bytes) -> bytes:
        if name == "metadata.json":
            return json.dumps({**json.loads(data), "date_saved": KERAS_SAVE_DATE}).encode()
        if name == "config.json":
            return json.dumps(renumber_shared_ids(json.loads(data), {})).encode()
        return data

    with fileio.atomic_path(path) as tmp:
        keras_tmp = tmp.with_name(tmp.name + ".keras")  # Keras insists on the suffix
        try:
            model.save(keras_tmp)
            fileio.reproducible_zip(keras_tmp, fixed_date)
            os.replace(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)



def renumber_shared_ids(config: Any, ids: dict[Any, int]) -> Any:
    """``config`` with every ``shared_object_id`` (an ``id()``) replaced by 1, 2, ... in order of appearance."""
    if isinstance(config, dict):
        out = {k: renumber_shared_ids(v, ids) for k, v in config.items()}
        if "shared_object_id" in config:
            out["shared_object_id"] = ids.setdefault(config["shared_object_id"], len(ids) + 1)
        return out
    if isinstance(config, list):
        return [renumber_shared_ids(v, ids) for v in config]
    return config
