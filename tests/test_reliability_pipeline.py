"""The whole pipeline under faults: `dvc repro` killed (SIGKILL) mid-stage and run again, fresh clones,
`dvc repro --force`, and two queued experiments at once; all must end with the committed dvc.lock.

A module-scoped reference repo runs the shrunk pipeline once and commits dvc.lock and the metrics.
Every other run is a `git clone` of it (what a colleague or CI gets) and must reproduce those
files byte for byte: `git status` clean afterwards means dvc.lock, metrics/*.json, history.csv and
reports/eval/* are identical, and dvc.lock pins the hash of every cached out (features, models...).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from audiocnn import fileio
from conftest import make_pipeline_repo, real_params, run, shrink, stages_run, tool_env, wait_for_queue

pytestmark = pytest.mark.slow

EPOCHS = 4
ALL_STAGES = ["demo", "ingest", "normalize", "spectrogram", "split", "train", "evaluate", "export"]


def params() -> dict:
    p = shrink(real_params())
    p["train"].update(epochs=EPOCHS, patience=EPOCHS)
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The pipeline run once, uninterrupted, with dvc.lock and the metrics committed."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("reference"), params())
    assert stages_run(run(["dvc", "repro"], repo).stdout)[-1] == "export"
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reference run"], repo)
    return repo


def clone(reference: Path, dest: Path) -> Path:
    """A git clone, minus evaluate's git-tracked outputs: with them present and the model reproduced,
    DVC would rightly skip evaluate; removed, evaluate must run and regenerate them byte for byte."""
    run(["git", "clone", "-q", str(reference), str(dest)], dest.parent)
    (dest / "metrics" / "eval.json").unlink()
    for path in (dest / "reports" / "eval").iterdir():
        path.unlink()
    return dest


def committed_state_is_reproduced(repo: Path) -> None:
    """dvc.lock and every git-tracked output equal the committed ones; DVC sees nothing to do."""
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    assert run(["dvc", "status"], repo).stdout.strip().endswith("up to date.")


def start_repro(repo: Path) -> tuple[subprocess.Popen, Path]:
    log = repo.parent / f"{repo.name}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=tool_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL the whole process group (dvc, the stage, its workers) once ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def backup_epoch(repo: Path) -> int:
    """The last epoch the training backup holds (0: none yet)."""
    pointers = list((repo / ".dvc" / "tmp" / "audiocnn" / "train-backup").glob("*/latest"))
    return int(pointers[0].read_text().split("-")[1]) if pointers else 0


def test_fresh_clone_reproduces_the_committed_lock_and_metrics(reference, tmp_path):
    repo = clone(reference, tmp_path / "clone")
    assert stages_run(run(["dvc", "repro"], repo).stdout) == ALL_STAGES  # nothing cached: all ran
    committed_state_is_reproduced(repo)


def test_forced_repro_is_byte_identical(reference):
    before = (reference / "models" / "model.keras").read_bytes()
    proc = run(["dvc", "repro", "--force"], reference)
    assert stages_run(proc.stdout) == ALL_STAGES
    committed_state_is_reproduced(reference)
    assert (reference / "models" / "model.keras").read_bytes() == before  # hence the same predictions
    with sqlite3.connect(reference / "mlflow.db") as db:
        runs = db.execute("select r.status, count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                          "and t.key = 'model_sha256' group by t.value, r.status").fetchall()
    assert runs == [("FINISHED", 2)]  # two trainings, one model


def test_kill_during_spectrogram_then_repro(reference, tmp_path):
    repo = clone(reference, tmp_path / "killed")
    proc, _ = start_repro(repo)
    features = repo / "dataset" / "features"

    def arrays() -> list[Path]:  # in the folder, or in the stage's staging folder beside it
        return [*features.glob("*.npy"), *features.parent.glob(".features.*.tmp/features.npy")]

    kill_when(proc, lambda: arrays() and not (features / "meta.json").exists())
    assert not (features / "meta.json").exists()  # killed mid-stage
    # the stage builds its folders under hidden temporary names (store.staged_dir), renamed only when
    # complete: nothing under the output's name, only the staging folder, whose last file may be cut
    assert not features.exists() and list(features.parent.glob(".features.*.tmp"))
    assert "spectrogram" in run(["dvc", "status"], repo).stdout  # DVC does not take it as done

    again = run(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == ["spectrogram", "split", "train", "evaluate", "export"]
    committed_state_is_reproduced(repo)
    assert not list(features.glob(".*.tmp")) and not list(features.parent.glob(".*.tmp"))
    for path in sorted((reference / "dataset" / "features").iterdir()):
        assert (features / path.name).read_bytes() == path.read_bytes(), path.name


def test_kill_during_training_resumes_from_the_last_epoch(reference, tmp_path):
    repo = clone(reference, tmp_path / "killed")
    proc, log = start_repro(repo)
    kill_when(proc, lambda: backup_epoch(repo) >= 2)  # epoch 2 saved: now in the middle of epoch 3
    assert not (repo / "models" / "model.keras").exists()
    [backup] = (repo / ".dvc" / "tmp" / "audiocnn" / "train-backup").iterdir()
    done = backup_epoch(repo)
    assert 2 <= done < EPOCHS

    again = run(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == ["train", "evaluate", "export"]
    assert f"resuming training after epoch {done}/{EPOCHS}" in again.stderr + again.stdout
    committed_state_is_reproduced(repo)
    assert not backup.exists()
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        tags = dict(db.execute("select key, value from tags where key in ('resumed_at_epoch', 'model_sha256')"))
        evaluated = db.execute("select count(*) from metrics where key = 'eval/accuracy'").fetchone()[0]
    assert [status for _, status in runs] == ["FINISHED"]  # the killed attempt's run, continued
    assert tags["resumed_at_epoch"] == str(done) and evaluated == 1
    assert tags["model_sha256"] == fileio.sha256_file(repo / "models" / "model.keras")


@pytest.mark.timeout(900)
def test_two_queued_experiments_run_at_once(reference, tmp_path):
    repo = clone(reference, tmp_path / "queue")
    run(["dvc", "repro"], repo)  # the baseline's outputs, so the experiments rerun train, evaluate and export only
    lrs = {"fast-lr": 0.01, "slow-lr": 0.001}
    for name, lr in lrs.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_queue(repo, 800)
    assert status.count("Success") == 2, status
    for name in lrs:
        logs = run(["dvc", "queue", "logs", name], repo, check=False)
        assert "database is locked" not in logs.stdout.replace("tracking database is locked (try", ""), logs.stdout

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    exp_metrics = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data", {})
                if rev.get("name") in lrs:
                    exp_metrics[rev["name"]] = data["metrics"]["metrics/train.json"]["data"]
    assert set(exp_metrics) == set(lrs)
    with sqlite3.connect(repo / "mlflow.db") as db:
        spans = db.execute("select r.start_time, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
                           "and t.key = 'dvc_exp_name'").fetchall()
        rows = db.execute(
            "select t.value, r.status, p.value, "
            " (select value from metrics m where m.run_uuid = r.run_uuid and m.key = 'train/best_val_loss'),"
            " (select count(*) from metrics m where m.run_uuid = r.run_uuid and m.key = 'eval/accuracy')"
            " from runs r join tags t on t.run_uuid = r.run_uuid and t.key = 'dvc_exp_name'"
            " join params p on p.run_uuid = r.run_uuid and p.key = 'train.lr'").fetchall()
    assert sorted(row[0] for row in rows) == sorted(lrs)  # one run each, both in the one database
    for name, status, lr, best_val_loss, evaluated in rows:
        assert status == "FINISHED" and float(lr) == lrs[name] and evaluated == 1
        assert best_val_loss == pytest.approx(exp_metrics[name]["best_val_loss"])  # its own outputs
    assert exp_metrics["fast-lr"] != exp_metrics["slow-lr"]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a  # the two trainings really ran at the same time
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
