"""DVC experiments: `-S train.lr=...` reruns only train and evaluate, and every run
(workspace, queued) lands in the main repository's MLflow database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import make_pipeline_repo, real_params, run, shrink, stages_run, wait_for_queue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory) -> Path:
    """A repo copy whose pipeline ran once and whose dvc.lock and metrics are committed."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("exp"), shrink(real_params()))
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline run"], repo)
    return repo


def mlflow_runs(db: Path) -> list[tuple[str, str, str]]:
    """(run id, status, DVC experiment name tag) of every run in the database."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "select r.run_uuid, r.status, coalesce(t.value, '') from runs r "
            "left join tags t on t.run_uuid = r.run_uuid and t.key = 'dvc_exp_name'"
        ).fetchall()


def test_exp_run_reruns_only_train_and_evaluate(committed_repo):
    proc = run(["dvc", "exp", "run", "-n", "lr-up", "-S", "train.lr=0.01"], committed_repo)
    assert stages_run(proc.stdout) == ["train", "evaluate", "export"]
    diff = run(["dvc", "params", "diff", "--md"], committed_repo).stdout
    assert "train.lr" in diff
    runs = mlflow_runs(committed_repo / "mlflow.db")
    assert ("lr-up" in {name for _, _, name in runs}) and all(status == "FINISHED" for _, status, _ in runs)


def test_queued_experiment_lands_in_main_database(committed_repo):
    before = len(mlflow_runs(committed_repo / "mlflow.db"))
    run(["dvc", "exp", "run", "--queue", "-n", "queued-lr", "-S", "train.lr=0.002"], committed_repo)
    run(["dvc", "queue", "start"], committed_repo)
    status = wait_for_queue(committed_repo, 300)
    assert "Success" in status, status
    runs = mlflow_runs(committed_repo / "mlflow.db")
    assert len(runs) == before + 1
    assert "queued-lr" in {name for _, _, name in runs}
    assert not list((committed_repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
