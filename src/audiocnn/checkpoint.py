"""Resumable training: the whole training state after every epoch, kept outside the stage's outputs.

A train stage killed after k epochs (SIGKILL, OOM, a reboot) restarts at epoch k+1 with the
weights, optimizer slots, dropout RNG state, early-stopping state (best val_loss, patience count,
best weights) and history that the uninterrupted run had at that point; train.py makes the data
stream a function of (train.seed, epoch), so the resumed run ends with the same model and metrics.
Keras' BackupAndRestore keeps only weights, optimizer and the epoch number: with
``restore_best_weights`` and our history.csv the result would differ, hence this module.

Where: ``$AUDIOCNN_TRAIN_BACKUP_DIR/<key>`` (``off`` disables it), else ``<main repo>/.dvc/tmp/audiocnn/train-backup/<key>``
(git-ignored, never a DVC out, so DVC's removal of outs before a rerun keeps it); without either
(no ``.dvc`` folder) training is not resumable. ``key`` hashes params, split files, features
meta and the package code: a backup is only ever resumed by the same training. Each epoch goes
to a new folder, then the ``latest`` pointer is replaced atomically, so a kill at any moment
leaves the previous epoch loadable. An exclusive flock keeps two identical concurrent trainings
(e.g. two queued experiments) out of one folder: the second trains without a backup. The
folder is removed when the stage succeeds; backups of trainings never rerun (params changed
after a kill) are removed after MAX_AGE_DAYS. It also holds ``run.json``, the MLflow run to continue.
A backup that cannot be written (disk full) is dropped with a warning: training goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from audiocnn import fileio

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

ENV_DIR = "AUDIOCNN_TRAIN_BACKUP_DIR"
REPO_DIR = Path(".dvc") / "tmp" / "audiocnn" / "train-backup"
MAX_AGE_DAYS = 7  # other trainings' backups untouched this long are abandoned: removed when a training starts


@dataclasses.dataclass
class TrainState:
    """What besides the variables a resumed training needs; ``epochs_done`` completed epochs."""

    epochs_done: int = 0
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)  # history, one row per epoch
    best: float | None = None  # EarlyStopping: best monitored value so far
    wait: int = 0  # EarlyStopping: epochs without improvement
    best_epoch: int = 0  # EarlyStopping: 0-based epoch of ``best``
    stopped: bool = False  # EarlyStopping ended the training
    best_weights: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)


def training_key(params: Mapping[str, Any], files: Iterable[Path]) -> str:
    """sha256 (first 16 hex) of the params, the bytes of ``files`` that exist, the package code and versions."""
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    code = Path(__file__).parent
    for path in [*files, *sorted(code.glob("*.py"))]:
        if Path(path).is_file():
            digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    digest.update(f"keras {version('keras')} tensorflow {version('tensorflow-cpu')}".encode())
    return digest.hexdigest()[:16]


def backup_root(repo_root: Path) -> Path | None:
    """``$AUDIOCNN_TRAIN_BACKUP_DIR`` (``off``: None), else ``<repo_root>/.dvc/tmp/...`` in a DVC repo, else None."""
    if os.environ.get(ENV_DIR):
        return None if os.environ[ENV_DIR] == "off" else Path(os.environ[ENV_DIR])
    return repo_root / REPO_DIR if (repo_root / ".dvc").is_dir() else None


class Backup:
    """One training's backup folder (locked while open), or a no-op when ``folder`` is None."""

    def __init__(self, folder: Path | None, lock: IO[str] | None = None) -> None:
        self.folder, self._lock = folder, lock
        self._best: tuple[str, int] | None = None  # (epoch folder, best_epoch) whose best.npz can be linked

    @classmethod
    def open(cls, root: Path | None, key: str) -> "Backup":
        if root is None:
            log.info("no .dvc folder and %s unset (or off): training is not resumable", ENV_DIR)
            return cls(None)
        import fcntl

        folder = root / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / "lock", "a")
        except OSError as err:
            log.warning("cannot use training backup %s (%s): training is not resumable", folder, err.strerror)
            return cls(None)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.warning("training backup %s is in use by another training of the same key: not resumable", folder)
            return cls(None)
        _prune(root, keep=key)
        return cls(folder, lock)

    def run_id(self) -> str | None:
        """The MLflow run an earlier, interrupted attempt of this training logged to."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return fileio.read_json(self.folder / "run.json").get("run_id") if self.folder else None
        return None

    def set_run_id(self, run_id: str) -> None:
        if self.folder:
            self._try(fileio.write_json, self.folder / "run.json", {"run_id": run_id})

    def load(self, model: "keras.Model") -> TrainState | None:
        """Restore the latest epoch into ``model`` (variables and optimizer); its state, or None."""
        if self.folder is None or not (self.folder / "latest").is_file():
            return None
        where = self.folder / (self.folder / "latest").read_text(encoding="utf-8").strip()
        try:
            raw = fileio.read_json(where / "state.json")
            state = TrainState(**{k: raw[k] for k in ("epochs_done", "rows", "best", "wait", "best_epoch", "stopped")})
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            values = _load_arrays(where / "model.npz"), _load_arrays(where / "optimizer.npz")
            for variables, arrays in zip((model.variables, model.optimizer.variables), values):
                _check_shapes(variables, arrays, where)
            if (where / "best.npz").is_file():
                state.best_weights = _load_arrays(where / "best.npz")
                self._best = (where.name, state.best_epoch)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            log.warning("training backup %s is unusable (%s): training starts over", where, err)
            return None
        for variables, arrays in zip((model.variables, model.optimizer.variables), values):
            for variable, array in zip(variables, arrays):
                variable.assign(array)
        return state

    def save(self, model: "keras.Model", state: TrainState) -> None:
        """Write epoch ``state.epochs_done`` (new folder, then the ``latest`` pointer); drop older epochs."""
        if self.folder is None:
            return
        name = f"epoch-{state.epochs_done:04d}"
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _save_arrays(tmp / "model.npz", [v.numpy() for v in model.variables])
            _save_arrays(tmp / "optimizer.npz", [v.numpy() for v in model.optimizer.variables])
            if state.best_weights is not None:  # unchanged since the last epoch: a hard link, not another copy
                previous = self.folder / self._best[0] / "best.npz" if self._best else None
                if previous is None or self._best[1] != state.best_epoch or not _link(previous, tmp / "best.npz"):
                    _save_arrays(tmp / "best.npz", state.best_weights)
            fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "best_weights"}
            fileio.write_json(tmp / "state.json", fields)
            shutil.rmtree(self.folder / name, ignore_errors=True)
            os.replace(tmp, self.folder / name)
            fileio.write_text(self.folder / "latest", name + "\n")

        if self._try(write):
            self._best = (name, state.best_epoch) if state.best_weights is not None else None
            for old in self.folder.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        """Delete the folder (the training finished and its outputs are written)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _try(self, fn: Any, *args: Any) -> bool:
        """Run a write; on an OS error (disk full...) warn and go on without a backup."""
        try:
            fn(*args)
        except OSError as err:
            log.warning("cannot write training backup in %s (%s): continuing without one", self.folder, err)
            self.close()
            self.folder = None
            return False
        return True


def _prune(root: Path, keep: str, max_age_s: float = MAX_AGE_DAYS * 86400) -> None:
    """Remove backups of other trainings untouched for ``max_age_s`` that no process holds (abandoned)."""
    import fcntl
    import time

    for folder in root.iterdir():
        if folder.name == keep or not folder.is_dir():
            continue
        with contextlib.suppress(OSError):
            if time.time() - max(p.stat().st_mtime for p in [folder, *folder.iterdir()]) < max_age_s:
                continue
            with open(folder / "lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError when in use: kept
                log.info("removing abandoned training backup %s", folder)
                shutil.rmtree(folder, ignore_errors=True)


def _link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    with fileio.atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, *[np.asarray(a) for a in arrays])


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


def _check_shapes(variables: list[Any], arrays: list[np.ndarray], where: Path) -> None:
    if len(variables) != len(arrays) or any(tuple(v.shape) != a.shape for v, a in zip(variables, arrays)):
        raise ValueError(f"{where}: saved variables do not match the model")


def callback(backup: Backup, stop: "keras.callbacks.EarlyStopping", state: TrainState) -> Any:
    """Keras callback, placed after ``stop`` and the loggers: restores ``stop``'s state when training
    begins, appends each epoch's logs to ``state.rows`` and saves the backup at each epoch end."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            if state.epochs_done:  # after stop.on_train_begin, which resets it
                stop.best, stop.wait, stop.best_epoch = state.best, state.wait, state.best_epoch
                stop.best_weights = state.best_weights

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            state.rows.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
            state.epochs_done, state.wait, state.best_epoch = epoch + 1, int(stop.wait), int(stop.best_epoch)
            state.best = None if stop.best is None else float(stop.best)
            state.best_weights = stop.best_weights
            state.stopped = bool(self.model.stop_training)
            backup.save(self.model, state)

    return Checkpoint()
