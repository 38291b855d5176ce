"""Reliability of single stages: atomic outputs under SIGKILL, clear errors on unwritable outputs,
nothing unpickled, byte-reproducible model files, and training that resumes after a kill.

The whole-pipeline versions (``dvc repro`` killed mid-stage, fresh clones, queued experiments)
are in test_reliability_pipeline.py.
"""

from __future__ import annotations

import ast
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from audiocnn import checkpoint, fileio
from audiocnn.errors import DataError
from conftest import REPO, real_params, shrink, tool_env
from test_ingest import write_clip

# --- atomic outputs ---------------------------------------------------------------------------------------

WRITER = """
import sys, numpy as np
from audiocnn import fileio
big = np.arange(20_000_000, dtype=np.float64)  # 160 MB: each write takes a while
print("ready", flush=True)
while True:
    fileio.write_npy(sys.argv[1], big)
"""


def test_sigkill_mid_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "big.npy"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, env=tool_env())
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(".big.npy.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)  # until a temporary file is being written
    proc.kill()
    proc.wait()
    leftovers = list(target.parent.glob(".big.npy.*.tmp"))
    assert leftovers, "the writer was not caught mid-write"
    if target.exists():  # a complete earlier write, never the half-written one
        assert fileio.load_npy(target, mmap=True).shape == (20_000_000,)
    fileio._swept.clear()  # as in a new process
    fileio.write_json(target.parent / "other.json", {"a": 1})  # the next write into the folder sweeps
    assert not list(target.parent.glob(".*.tmp"))


def test_sweep_keeps_temporaries_of_live_processes(tmp_path):
    live = tmp_path / f".x.json.{os.getppid()}.abcd1234.tmp"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f".y.json.{dead_pid}.abcd1234.tmp"
    live.write_text("{")
    dead.write_text("{")
    fileio._swept.clear()
    fileio.write_json(tmp_path / "z.json", {})
    assert live.exists() and not dead.exists()


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.json"
    fileio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert fileio.read_json(target) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# --- unwritable outputs: exit 2, one line naming the path, no traceback ----------------------------------


def run_ingest_stage(tmp_path: Path, out: Path, preexec=None) -> subprocess.CompletedProcess:
    source = tmp_path / "src"
    for i in range(3):
        write_clip(source / "a" / f"{i}.wav", seed=i)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {**real_params()["ingest"], "source": str(source)}}))
    cmd = [sys.executable, str(REPO / "stages" / "ingest.py"), "--params", str(params), "--source", str(source),
           "--manifest", str(out / "manifest.csv"), "--rejected", str(out / "rejected.csv"),
           "--metrics", str(out / "ingest.json")]
    return subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), preexec_fn=preexec)


def assert_clean_failure(proc: subprocess.CompletedProcess, path: Path, reason: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(path) in errors[0] and reason in errors[0], proc.stderr


def test_output_under_a_file_names_the_path(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    out = tmp_path / "blocker" / "ingest"
    assert_clean_failure(run_ingest_stage(tmp_path, out), out / "manifest.csv", "Not a directory")


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` unwritable, also for root (chattr +i) where chmod would not stop it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is not available: root ignores permissions")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_names_the_path(tmp_path):
    out = tmp_path / "out"
    with read_only(out):
        proc = run_ingest_stage(tmp_path, out)
    reason = "Permission denied" if os.geteuid() != 0 else "Operation not permitted"
    assert_clean_failure(proc, out / "manifest.csv", reason)


def limit_file_size() -> None:  # runs in the child before exec: a 'disk' that takes 300 bytes per file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))


def test_full_disk_names_the_path(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_ingest_stage(tmp_path, out, preexec=limit_file_size), out / "manifest.csv",
                         "File too large")
    assert not (out / "manifest.csv").exists() and not list(out.glob(".*.tmp"))


def test_full_tmpfs_names_the_path(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as handle:
            handle.write(b"\0" * 64 * 1024)  # fill it
        assert_clean_failure(run_ingest_stage(tmp_path, mount / "out"), mount / "out" / "manifest.csv",
                             "No space left on device")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- nothing the pipeline reads is unpickled; models load in safe mode ------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)]


def keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), "missing")


@pytest.mark.parametrize("path", sorted([*(REPO / "src" / "audiocnn").glob("*.py"), *(REPO / "stages").glob("*.py")]),
                         ids=lambda p: p.name)
def test_no_pickle_anywhere(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & PICKLE_MODULES
    assert not calls(tree, "read_pickle") and not calls(tree, "from_pickle")
    for call in calls(tree, "load"):  # np.load / numpy.load: never with pickles
        owner = getattr(call.func, "value", None)
        if getattr(owner, "id", None) in ("np", "numpy"):
            assert keyword(call, "allow_pickle") is False, f"{path.name}:{call.lineno}"
    for call in calls(tree, "load_model"):  # keras.saving.load_model & co: only in safe mode
        receiver = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""
        if "keras" in receiver or receiver == "saving":
            assert keyword(call, "safe_mode") is True, f"{path.name}:{call.lineno}"


def test_pickled_arrays_are_refused(tmp_path):
    from audiocnn import data, packed

    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        fileio.load_npy(tmp_path / "evil.npy")
    packed.write(tmp_path / "features", {"evil": np.zeros((2, 3), np.float32)})
    np.save(tmp_path / "features" / "features.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="features.npy"):
        data.load_features(tmp_path / "features", "evil")


def test_model_with_code_is_refused(tmp_path):
    import keras

    from audiocnn import evaluate

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)  # arbitrary code: only loads with safe_mode=False
    (tmp_path / "models").mkdir()
    keras.Model(inputs, outputs).save(tmp_path / "models" / "model.keras")
    fileio.write_json(tmp_path / "models" / "labels.json", {"labels": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match="safe_mode"):
        evaluate.load_model(tmp_path / "models")


# --- the models out is byte-reproducible -------------------------------------------------------------------

def test_model_dir_bytes_depend_on_the_weights_only(tmp_path):
    import keras

    from audiocnn import models, modelfile

    for name in ("one", "two"):  # two model objects (other ids for shared objects), saved at other times
        keras.utils.set_random_seed(3)
        modelfile.write_model_dir(tmp_path / name, models.build_cnn(3, (31, 16, 1), 8, 0.3), ["a", "b", "c"],
                                  {"window_seconds": 0.3})
        time.sleep(1.1 if name == "one" else 0)
    one, two = (sorted((p.name, p.read_bytes()) for p in (tmp_path / n).iterdir()) for n in ("one", "two"))
    assert [name for name, _ in one] == ["labels.json", "model.keras", "preprocess.json"] and one == two
    with zipfile.ZipFile(tmp_path / "one" / "model.keras") as archive:
        assert {info.date_time for info in archive.infolist()} == {fileio.ZIP_EPOCH}
        assert b'"shared_object_id": 1' in archive.read("config.json")
    model = keras.saving.load_model(tmp_path / "one" / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 3)


# --- training state backup ---------------------------------------------------------------------------------


def tiny_model():
    import keras

    from audiocnn import models

    keras.utils.set_random_seed(0)
    model = models.build_cnn(3, (31, 16, 1), 8, 0.3)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(8, 31, 16, 1)), np.eye(3)[np.arange(8) % 3]
    return model, x.astype(np.float32), y


def test_backup_restores_every_variable_and_the_state(tmp_path):
    model, x, y = tiny_model()
    model.fit(x, y, epochs=2, verbose=0)
    backup = checkpoint.Backup.open(tmp_path, "k")
    state = checkpoint.TrainState(epochs_done=2, rows=[{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}],
                                  best=0.5, wait=0, best_epoch=1, best_weights=model.get_weights())
    backup.save(model, state)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["epoch-0002", "latest", "lock"]
    backup.close()

    fresh, _, _ = tiny_model()
    restored = checkpoint.Backup.open(tmp_path, "k").load(fresh)
    assert restored.epochs_done == 2 and restored.rows == state.rows and restored.best == 0.5
    for saved, loaded in ((model.variables, fresh.variables), (model.optimizer.variables, fresh.optimizer.variables)):
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(saved, loaded))
    assert any("seed_generator" in v.path for v in fresh.variables)  # dropout's RNG state is part of it
    assert all(np.array_equal(a, b) for a, b in zip(restored.best_weights, state.best_weights))


def test_damaged_or_busy_backup_means_starting_over(tmp_path, caplog):
    model, _, _ = tiny_model()
    backup = checkpoint.Backup.open(tmp_path, "k")
    backup.save(model, checkpoint.TrainState(epochs_done=1))
    assert checkpoint.Backup.open(tmp_path, "k").folder is None  # locked by ``backup``: no sharing
    backup.close()
    (tmp_path / "k" / "epoch-0001" / "model.npz").write_bytes(b"PK\x03\x04 truncated")
    assert checkpoint.Backup.open(tmp_path, "k").load(model) is None
    assert "unusable" in caplog.text and "starts over" in caplog.text


def test_resuming_an_early_stopped_training_only_restores_the_best_weights(tmp_path):
    import keras

    model, x, y = tiny_model()
    best = [w + 1.0 for w in model.get_weights()]
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)
    state = checkpoint.TrainState(epochs_done=3, best=0.1, wait=1, best_epoch=1, stopped=True, best_weights=best)
    model.fit(x, y, initial_epoch=3, epochs=3, verbose=0,  # what train.py does for a stopped state: no epoch
              callbacks=[stop, checkpoint.callback(checkpoint.Backup(None), stop, state)])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), best)) and state.rows == []


def test_unwritable_backup_is_dropped_and_training_goes_on(tmp_path, caplog):
    model, x, y = tiny_model()
    backup = checkpoint.Backup.open(tmp_path, "k")
    (tmp_path / "k" / "lock").unlink()
    (tmp_path / "k").rename(tmp_path / "gone")
    (tmp_path / "k").write_text("a file where the folder was")  # every write below it fails
    backup.save(model, checkpoint.TrainState(epochs_done=1))
    assert backup.folder is None and "continuing without one" in caplog.text
    backup.save(model, checkpoint.TrainState(epochs_done=2))  # a no-op now


def test_abandoned_backups_of_other_trainings_are_pruned(tmp_path):
    import fcntl

    for key in ("old", "old-in-use", "recent"):
        (tmp_path / key).mkdir()
        (tmp_path / key / "lock").write_text("")
        if key.startswith("old"):
            for path in (tmp_path / key, tmp_path / key / "lock"):
                os.utime(path, (time.time() - 8 * 86400,) * 2)
    with open(tmp_path / "old-in-use" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        checkpoint.Backup.open(tmp_path, "mine").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "old-in-use", "recent"]


def test_backup_root(tmp_path, monkeypatch):
    monkeypatch.delenv(checkpoint.ENV_DIR, raising=False)
    assert checkpoint.backup_root(tmp_path) is None  # not a DVC repo: no .dvc/tmp to create
    (tmp_path / ".dvc").mkdir()
    assert checkpoint.backup_root(tmp_path) == tmp_path / ".dvc" / "tmp" / "audiocnn" / "train-backup"
    monkeypatch.setenv(checkpoint.ENV_DIR, str(tmp_path / "elsewhere"))
    assert checkpoint.backup_root(tmp_path) == tmp_path / "elsewhere"
    monkeypatch.setenv(checkpoint.ENV_DIR, "off")
    assert checkpoint.backup_root(tmp_path) is None


# --- a training killed mid-epoch resumes and ends exactly as an uninterrupted one -------------------------


def train_cmd(root: Path, out: str) -> list[str]:
    o = root / out
    return [sys.executable, str(REPO / "stages" / "train.py"), "--params", str(root / "params.yaml"),
            "--features", str(root / "features"), "--images", str(root / "spectrograms"), "--split",
            str(root / "split"), "--model", str(o / "models"), "--metrics", str(o / "metrics.json"),
            "--history", str(o / "history.csv"), "--curves", str(o / "curves.png")]


def outputs(root: Path, out: str) -> dict[str, bytes]:
    names = ("metrics.json", "history.csv", "models/model.keras", "models/labels.json", "models/preprocess.json")
    return {name: (root / out / name).read_bytes() for name in names}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_training_resumes_from_its_last_epoch(tmp_path):
    import mlflow

    from test_train import synthetic_dataset, tiny_params

    root = synthetic_dataset(tmp_path, {"train": 24, "val": 4})
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(shrink(real_params()), epochs=5, patience=5,
                                                                 lr=0.01)))
    env = {**tool_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           checkpoint.ENV_DIR: str(root / "backup")}
    subprocess.run(train_cmd(root, "reference"), env=env, check=True, capture_output=True)

    log = root / "killed.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(train_cmd(root, "resumed"), env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    def saved_epoch() -> int:
        pointers = list((root / "backup").glob("*/latest"))
        return int(pointers[0].read_text().split("-")[1]) if pointers else 0

    while saved_epoch() < 2 and proc.poll() is None:  # epoch 2 saved: now in the middle of epoch 3
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "resumed" / "metrics.json").exists()
    [folder] = (root / "backup").iterdir()
    done = int((folder / "latest").read_text().split("-")[1])
    assert 2 <= done < 5

    again = subprocess.run(train_cmd(root, "resumed"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming training after epoch {done}/5" in again.stderr
    assert f"epoch {done}/5:" not in again.stderr and f"epoch {done + 1}/5:" in again.stderr  # not started over
    assert outputs(root, "resumed") == outputs(root, "reference")  # bytes: metrics, history, model
    assert not (root / "backup" / folder.name).exists()  # removed on success

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("audiocnn").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # reference + one for both attempts
    [resumed] = [r for r in runs if "resumed_at_epoch" in r.data.tags]
    assert resumed.data.tags["resumed_at_epoch"] == str(done)
    steps = sorted({m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")})
    assert steps == [1, 2, 3, 4, 5]

    # outputs unwritable at the very end: exit 2 naming the path; fixed, the rerun only writes the outputs
    (root / "blocker").write_text("")
    cmd = train_cmd(root, "blocked")
    cmd[cmd.index("--model") + 1] = str(root / "blocker" / "models")
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"cannot create output directory {root / 'blocker' / 'models'}" in failed.stderr
    (root / "blocker").unlink()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert "resuming training after epoch 5/5" in done.stderr
    assert "audiocnn.train: epoch 1/5:" not in done.stderr  # no epoch trained again ("best epoch 1/5" may be)
    assert (root / "blocker" / "models" / "model.keras").read_bytes() == outputs(root, "reference")["models/model.keras"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_ensemble_resumes_without_training_its_finished_networks_again(tmp_path):
    from test_train import synthetic_dataset, tiny_params

    root = synthetic_dataset(tmp_path, {"train": 24, "val": 4})
    params = tiny_params(shrink(real_params()), epochs=3, patience=3, lr=0.01)
    params["model"]["members"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**tool_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", checkpoint.ENV_DIR: str(root / "backup")}
    subprocess.run(train_cmd(root, "reference"), env=env, check=True, capture_output=True)

    with open(root / "killed.log", "w") as handle:
        proc = subprocess.Popen(train_cmd(root, "resumed"), env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    second = lambda: list((root / "backup").glob("*-member1/latest"))  # noqa: E731
    while not second() and proc.poll() is None:  # network 0 done, network 1 has saved an epoch
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "resumed" / "metrics.json").exists()
    assert len(list((root / "backup").glob("*-member0/latest"))) == 1  # kept until the ensemble is written

    again = subprocess.run(train_cmd(root, "resumed"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming training of member0 after epoch 3/3" in again.stderr
    assert "resuming training of member1 after epoch" in again.stderr
    assert "audiocnn.train: epoch 1/3:" not in again.stderr  # neither network starts over
    assert outputs(root, "resumed") == outputs(root, "reference")  # bytes: metrics, history, model
    assert not any((root / "backup").iterdir())  # every network's backup removed on success
