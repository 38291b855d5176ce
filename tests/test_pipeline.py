"""End to end: `dvc repro` on the demo set in a throwaway copy of the repo, with shrunk params.

One module-scoped run feeds several checks; reruns check that DVC reruns exactly
what a change touches.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf
import yaml

from conftest import make_pipeline_repo, real_params, run, shrink, stages_run, tool_env

ALL_STAGES = ["demo", "ingest", "normalize", "spectrogram", "split", "train", "evaluate", "export"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repo copy after one full `dvc repro`."""
    path = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), shrink(real_params()))
    proc = run(["dvc", "repro"], path)
    assert stages_run(proc.stdout) == ALL_STAGES
    return path


def test_data_stage_outputs(repo):
    manifest = pd.read_csv(repo / "dataset/ingest/manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == [
        "id", "path", "label", "group", "fold", "duration", "sample_rate", "channels", "sha256"
    ]
    assert sorted(manifest.label.unique()) == ["background", "chainsaw", "engine", "storm"]
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["clips"] == len(manifest) == 32 and ingest["rejected"] == 0 and ingest["classes"] == 4

    index = pd.read_csv(repo / "dataset/features/index.csv", dtype=str, keep_default_na=False)
    assert len(index) == 32
    splits = {name: pd.read_csv(repo / f"dataset/split/{name}.csv", dtype=str) for name in ("train", "val", "test")}
    ids = [set(frame.id) for frame in splits.values()]
    assert sum(map(len, ids)) == 32 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert (repo / "reports/gallery.png").stat().st_size > 10_000
    assert not list((repo / "dataset/spectrograms").rglob("*.png")) and set(index["image"]) == {""}  # images: false


def test_train_and_evaluate_outputs(repo):
    assert (repo / "models/model.keras").is_file()
    labels = json.loads((repo / "models/labels.json").read_text())["labels"]
    assert labels == ["background", "chainsaw", "engine", "storm"]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "per_class"):
        assert key in evaluation
    assert set(evaluation["per_class"]) == set(labels)
    history = pd.read_csv(repo / "reports/train/history.csv")
    assert list(history.epoch) == [1, 2] or list(history.epoch) == [0, 1]
    for name in ("reports/train/curves.png", "reports/eval/confusion.png", "reports/eval/report.md"):
        assert (repo / name).is_file(), name
    confusion = pd.read_csv(repo / "reports/eval/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == evaluation["clips"]


def test_mlflow_run_in_repo_database(repo):
    db = repo / "mlflow.db"
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        runs = conn.execute("select run_uuid, status from runs").fetchall()
        assert [status for _, status in runs] == ["FINISHED"]
        keys = {row[0] for row in conn.execute("select key from metrics")}
        params = {row[0] for row in conn.execute("select key from params")}
    assert {"loss", "val_loss", "accuracy", "eval/macro_f1"} <= keys
    assert "train.lr" in params and "spectrogram.n_mels" in params


def test_second_repro_runs_nothing(repo):
    proc = run(["dvc", "repro"], repo)
    assert stages_run(proc.stdout) == []
    assert run(["dvc", "status"], repo).stdout.strip().endswith("up to date.")


def test_a_changed_source_clip_reruns_the_data_stages_through_their_indexes(repo, tmp_path):
    """normalize depends on ingest's manifest (its sha256 column), not on the source folder; spectrogram on
    normalize's packed folder.

    A source file rewritten in place must still rerun them, and change only that clip's rows in both packed files.
    """
    source = tmp_path / "source"
    shutil.copytree(repo / "dataset/demo", source)
    for path in source.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # copies of read-only DVC outputs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["source"] = str(source)
    other = make_pipeline_repo(tmp_path / "repo", params)
    assert stages_run(run(["dvc", "repro", "spectrogram"], other).stdout) == ["ingest", "normalize", "spectrogram"]
    before = clip_rows(other / "dataset/features")
    before_clips = clip_rows(other / "dataset/normalize", "AUDIO")
    changed = sorted(source.rglob("*.wav"))[0]
    audio, rate = sf.read(changed, dtype="float32")
    sf.write(changed, audio[::-1].copy(), rate)  # same length, other content
    assert stages_run(run(["dvc", "repro", "spectrogram"], other).stdout) == ["ingest", "normalize", "spectrogram"]
    after = clip_rows(other / "dataset/features")
    assert sorted(after) == sorted(before)
    changed_id = next(n for n in after if n.startswith(changed.stem + "-"))  # ids: <file stem>-<path hash>
    assert [name for name in after if after[name] != before[name]] == [changed_id]
    after_clips = clip_rows(other / "dataset/normalize", "AUDIO")
    assert [name for name in after_clips if after_clips[name] != before_clips[name]] == [changed_id]
    assert run(["dvc", "status", "spectrogram"], other).stdout.strip().endswith("up to date.")
    assert stages_run(run(["dvc", "repro", "spectrogram"], other).stdout) == []


def clip_rows(folder: Path, kind: str = "FEATURES") -> dict[str, bytes]:
    """Each clip's rows of a packed folder (``FEATURES``, or ``AUDIO``: normalize's clips), by clip id."""
    from audiocnn import packed

    rows = packed.open_folder(folder, getattr(packed, kind))
    return {clip_id: rows.clip(clip_id).tobytes() for clip_id in rows.refs}


def test_metrics_and_plots_commands(repo):
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "accuracy" in shown and "clips" in shown
    run(["dvc", "plots", "show", "--json"], repo)


def test_changing_n_mels_reruns_spectrogram_and_downstream_only(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["spectrogram"]["n_mels"] = 48
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro"], repo)
    # split reads only features/index.csv, which n_mels does not change: DVC rightly skips it
    assert stages_run(proc.stdout) == ["spectrogram", "train", "evaluate", "export"]
    assert json.loads((repo / "dataset/features/meta.json").read_text())["n_mels"] == 48


def test_bad_params_stop_the_stage_with_the_key(tmp_path):
    params = shrink(real_params())
    params["spectrogram"]["n_mels"] = 512
    repo = make_pipeline_repo(tmp_path / "bad", params)
    proc = run(["dvc", "repro", "spectrogram"], repo, check=False)
    assert proc.returncode != 0
    assert "spectrogram.n_mels=512 exceeds n_fft/2+1=257" in proc.stdout + proc.stderr
    assert not (repo / "dataset/features").exists()
