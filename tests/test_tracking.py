"""MLflow tracking: where runs go, their tags and status, params/metrics naming, lock retries."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from audiocnn import tracking
from conftest import real_params, tool_env


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db) -> Path:
    """A fresh SQLite store in tmp_path; cwd tmp_path (not a git repo); no DVC variables."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")  # this process's client, also before any start_run
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return db


def get_run(run_id: str):
    return mlflow.MlflowClient().get_run(run_id)


# --- where runs go --------------------------------------------------------------------------


def test_uri_defaults_to_repo_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize("suffix", [".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/run/tmpab12cd/sub"])
def test_uri_of_temporary_experiment_is_main_repo(tmp_path, monkeypatch, suffix):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "repo" / suffix
    workspace.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/repo/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(workspace)  # without DVC_ROOT: from the working directory
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/repo/mlflow.db"


def test_uri_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    assert tracking.tracking_uri() == "http://mlflow.invalid:5000"


def test_artifacts_live_beside_the_database(store):
    with tracking.start_run() as run:
        pass
    assert get_run(run.info.run_id).info.artifact_uri.startswith((store.parent / "mlartifacts").as_uri())


# --- runs -----------------------------------------------------------------------------------


def test_new_run_tags(store, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=store.parent, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=store.parent, check=True, env=tool_env())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=store.parent, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "lr-up")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    monkeypatch.setenv("DVC_STAGE", "train")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "audiocnn-tests")
    with tracking.start_run() as run:
        pass
    got = get_run(run.info.run_id)
    assert got.data.tags["git_commit"] == head and len(head) == 40
    assert got.data.tags["dvc_exp_name"] == "lr-up" and got.info.run_name == "lr-up"
    assert got.data.tags["dvc_exp_baseline_rev"] == "abc123" and got.data.tags["dvc_stage"] == "train"
    assert mlflow.MlflowClient().get_experiment(got.info.experiment_id).name == "audiocnn-tests"
    assert got.info.status == "FINISHED"


def test_git_commit_empty_outside_git(store):
    with tracking.start_run(run_name="plain") as run:
        pass
    got = get_run(run.info.run_id)
    assert got.data.tags["git_commit"] == "" and got.info.run_name == "plain"
    assert "dvc_exp_name" not in got.data.tags


def test_exception_marks_run_failed_and_reraises(store):
    with pytest.raises(KeyError, match="boom"):
        with tracking.start_run() as run:
            tracking.log_metrics({"accuracy": 0.5})
            raise KeyError("boom")
    assert get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_resume_adds_to_the_same_run(store):
    with tracking.start_run() as first:
        tracking.log_metrics({"loss": 1.0}, step=0)
    with tracking.start_run(run_id=first.info.run_id) as again:
        tracking.log_metrics({"macro_f1": 0.75})
    assert again.info.run_id == first.info.run_id
    got = get_run(first.info.run_id)
    assert got.data.metrics == {"loss": 1.0, "macro_f1": 0.75} and got.info.status == "FINISHED"
    assert tracking.run_exists(first.info.run_id) and not tracking.run_exists("0" * 32)


def test_a_run_whose_process_died_is_marked_killed_by_the_next_start(store):
    """SIGKILL cannot end a run; the next run started on this machine marks it KILLED, and only it."""
    died = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal
        from audiocnn import tracking
        with tracking.start_run() as run:
            print(run.info.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)], cwd=store.parent, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert died.returncode == -9
    orphan = died.stdout.split()[-1]
    assert get_run(orphan).info.status == "RUNNING" and get_run(orphan).data.tags["pid"].isdigit()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id
    alive = client.create_run(experiment, tags={"host": tracking.socket.gethostname(), "pid": str(os.getpid())})
    remote = client.create_run(experiment, tags={"host": "another-machine", "pid": "1"})
    untagged = client.create_run(experiment)

    with tracking.start_run() as run:
        pass
    assert get_run(orphan).info.status == "KILLED"
    for other in (alive, remote, untagged):  # a live process, another machine's, unknown: left alone
        assert get_run(other.info.run_id).info.status == "RUNNING"
    assert get_run(run.info.run_id).info.status == "FINISHED"


# --- params, tags, metrics, artifacts -------------------------------------------------------


def test_params_flattened_with_lists_as_strings(store):
    params = real_params()
    params["demo"]["classes"] = ["x" * 4000, "y" * 4000]  # longer than MLflow's 6000-character limit
    with tracking.start_run() as run:
        tracking.log_params(params)
    logged = get_run(run.info.run_id).data.params
    assert logged["train.augment.noise_snr_db"] == "[5.0, 20.0]"
    assert logged["train.lr"] == "0.003" and logged["spectrogram.n_mels"] == "64"
    assert len(logged["demo.classes"]) == 6000
    assert set(logged) == set(tracking.params_to_log(params))


def test_changed_param_on_resume_becomes_a_tag(store):
    with tracking.start_run() as run:
        tracking.log_params({"evaluate": {"hop_seconds": 0.5, "batch_size": 64}})
    with tracking.start_run(run_id=run.info.run_id):
        tracking.log_params({"evaluate": {"hop_seconds": 0.25, "batch_size": 64}, "extra": {"k": 1}})
    got = get_run(run.info.run_id).data
    assert got.params == {"evaluate.hop_seconds": "0.5", "evaluate.batch_size": "64", "extra.k": "1"}
    assert got.tags["param_changed.evaluate.hop_seconds"] == "0.25"


def test_data_hash_tag(store, tmp_path):
    files = [tmp_path / "train.csv", tmp_path / "test.csv"]
    files[0].write_text("id,label\na,x\n")
    files[1].write_text("id,label\nb,y\n")
    with tracking.start_run() as run:
        value = tracking.set_data_tags(files)
    expected = hashlib.sha256(files[0].read_bytes() + files[1].read_bytes()).hexdigest()
    assert value == expected and get_run(run.info.run_id).data.tags["data_hash"] == expected


def test_nested_metrics_flattened_with_slashes(store):
    metrics = {"accuracy": 0.5, "clips": 4, "note": "skipped", "per_class": {"a b": {"f1": 0.25, "support": 2}}}
    assert tracking.flat_metrics(metrics, "test/") == {
        "test/accuracy": 0.5, "test/clips": 4.0, "test/per_class/a b/f1": 0.25, "test/per_class/a b/support": 2.0}
    assert tracking.metric_key("per_class/rock&roll/f1") == "per_class/rock_roll/f1"
    with tracking.start_run() as run:
        tracking.log_metrics(metrics)
    assert get_run(run.info.run_id).data.metrics["per_class/a b/f1"] == 0.25


def test_log_artifacts_files_and_dirs(store, tmp_path):
    reports = tmp_path / "eval"
    reports.mkdir()
    (reports / "report.md").write_text("# hi\n")
    (tmp_path / "eval.json").write_text("{}\n")
    with tracking.start_run() as run:
        tracking.log_artifacts([reports])
        tracking.log_artifacts([tmp_path / "eval.json"], artifact_path="eval")
        with pytest.raises(FileNotFoundError, match="missing.png"):
            tracking.log_artifacts([tmp_path / "missing.png"])
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert listed == {"eval/report.md", "eval/eval.json"}


# --- SQLite locks ---------------------------------------------------------------------------


def test_retry_on_locked_database(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert tracking._retry(flaky, 21) == 42 and len(calls) == 3
    with pytest.raises(ValueError):  # other errors are not retried
        tracking._retry(lambda: (_ for _ in ()).throw(ValueError("no")))


WRITER = textwrap.dedent("""
    import sys
    from audiocnn import tracking
    with tracking.start_run(run_name=sys.argv[1]):
        tracking.log_params({"writer": {"name": sys.argv[1]}})
        for step in range(40):
            tracking.log_metrics({"loss": 1.0 / (step + 1), "per_class": {"a": {"f1": step / 40}}}, step=step)
""")


@pytest.mark.slow  # 6-10 s: two interpreters importing MLflow on 2 shared cores
def test_two_processes_log_concurrently(store):
    """Two writers on a new database (dvc queue start -j 2): both runs complete, nothing lost."""
    store.unlink()  # no tables yet: both writers race to create them
    env = tool_env()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name], cwd=store.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("w1", "w2")]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["w1", "w2"]
    client = mlflow.MlflowClient()
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 40
        assert len(client.get_metric_history(r.info.run_id, "per_class/a/f1")) == 40


# --- Keras ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_epoch_logger_and_keras_model(store):
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((6, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(12, 6, 4, 1)).astype("float32")
    y = keras.utils.to_categorical(np.arange(12) % 3, 3)
    with tracking.start_run() as run:
        model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0, callbacks=[tracking.epoch_logger()])
        tracking.log_keras_model(model, ["a", "b", "c"])
    client = mlflow.MlflowClient()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert client.get_metric_history(run.info.run_id, "lr")[0].value == pytest.approx(0.01)
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/labels.json") == {"labels": ["a", "b", "c"]}
    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    loaded = mlflow.keras.load_model(logged.model_uri)
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    requirements = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/requirements.txt")).read_text()
    assert "tensorflow-cpu==" in requirements and "keras==" in requirements


def test_find_run_by_tag(store):
    assert tracking.find_run("model_sha256", "ab" * 32) is None  # no experiment yet
    ids = []
    for status in ("FINISHED", "FINISHED", "FAILED"):
        with tracking.start_run() as run:
            tracking.set_tags({"model_sha256": "ab" * 32})
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
        ids.append(run.info.run_id)
    with tracking.start_run():
        tracking.set_tags({"model_sha256": "cd" * 32})
    assert tracking.find_run("model_sha256", "ab" * 32) == ids[1]  # the latest FINISHED one
    assert tracking.find_run("model_sha256", "ef" * 32) is None
    assert tracking.find_run("model_sha256", "x' or '1'='1") is None  # not a filter injection


def test_environment_tags_name_what_determinism_depends_on(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    tags = tracking.environment_tags()
    assert tags["tf_onednn"] == "0" and tags["tf_intra_op_threads"] == "3" and tags["cpu"]
    assert int(tags["cpu_cores"]) >= 1 and tags["tensorflow"].count(".") >= 1
