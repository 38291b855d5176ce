"""Shared fixtures: the real params.yaml, shrunk; a throwaway copy of the repo for DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "datasets" / "fsdd" / "recordings"

# What a DVC run needs from the repo (code is imported from the installed package).
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore", ".gitignore"]


def real_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def shrink(params: dict) -> dict:
    """The real params, shrunk to a pipeline run of a few seconds per stage."""
    params["demo"].update(clips_per_class=8, min_seconds=1.0, max_seconds=2.0)
    params["spectrogram"].update(workers=2, image_size=64, gallery_per_class=2)
    params["split"].update(val_size=0.25, test_size=0.25)
    params["train"].update(epochs=2, batch_size=8, shuffle_buffer=64, patience=2)
    # 8 test clips from a 2-epoch model: one flipped clip is 12.5 points, so the gates get room
    params["export"].update(calibration_windows=16, min_top1_agreement=0.85, max_mean_abs_diff=0.01,
                            max_int8_accuracy_drop=0.26)
    return params


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, analytics off, quiet TF."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.setdefault("GIT_AUTHOR_NAME", "audiocnn tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@audiocnn.invalid")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    """Run a command, returning CompletedProcess; on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_pipeline_repo(dest: Path, params: dict) -> Path:
    """Copy the pipeline into ``dest`` as a fresh git repo with ``params`` committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (dest / "mlflow.db").unlink(missing_ok=True)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.name", "audiocnn tests"], dest)
    run(["git", "config", "user.email", "tests@audiocnn.invalid"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "pipeline under test"], dest)
    return dest


def stages_run(dvc_output: str) -> list[str]:
    """Stage names that ``dvc repro`` / ``dvc exp run`` executed, from its output."""
    return [line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage '")]


def wait_for_queue(repo: Path, seconds: float) -> str:
    """Poll ``dvc queue status`` until nothing is queued or running (or ``seconds`` pass); return the last status."""
    deadline = time.monotonic() + seconds
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if ("Queued" not in status and "Running" not in status) or time.monotonic() > deadline:
            return status
        time.sleep(3)


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables created once (the schema migration takes seconds); copy it per test."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def params() -> dict:
    return shrink(real_params())
