"""MLflow tracking: one run per training, resumed by evaluate, in the main repo's database.

The store is ``sqlite:///<repo>/mlflow.db`` (MLFLOW_TRACKING_URI overrides it), with
artifacts beside it in ``mlartifacts/``. The repo root is the main one even when DVC
runs an experiment in ``<repo>/.dvc/tmp/exps/<tmp>/`` (``dvc exp run --queue/--temp``),
so queued runs are not lost with their temporary workspace. Writes retry with backoff
when another process holds the SQLite lock (``dvc queue start -j 2``). TensorFlow is
imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import unquote

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from audiocnn.config import flatten

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EXPERIMENT = "audiocnn"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_EXPS_SUFFIX = (".dvc", "tmp", "exps")
_ATTEMPTS = 8  # SQLite lock retries; backoff 0.2 s doubling to 5 s (about 20 s in all)
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


# --- where runs go --------------------------------------------------------------------------


def repo_root(start: str | Path | None = None) -> Path:
    """The main repo root: DVC_ROOT (or cwd) without a ``.dvc/tmp/exps/...`` suffix."""
    path = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).absolute()
    parts = path.parts
    for i in range(len(parts) - len(_EXPS_SUFFIX) + 1):
        if parts[i : i + len(_EXPS_SUFFIX)] == _EXPS_SUFFIX:
            return Path(*parts[:i])
    return path


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else ``sqlite:///<main repo root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo_root() / DB_NAME).as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return Path(path).absolute() if path and path != ":memory:" else None


# --- robust writes --------------------------------------------------------------------------


def _is_locked(err: BaseException | None) -> bool:
    seen = 0
    while err is not None and seen < 10:
        text = str(err)
        if "database is locked" in text or "database table is locked" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; on 'database is locked' retry with jittered exponential backoff."""
    delay = 0.2
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if attempt == _ATTEMPTS or not _is_locked(err):
                raise
            pause = delay * (1.0 + random.random())
            log.warning("%s: tracking database is locked (try %d/%d), retrying in %.1f s",
                        getattr(fn, "__name__", fn), attempt, _ATTEMPTS, pause)
            time.sleep(pause)
            delay = min(delay * 2.0, 5.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _init_lock(db: Path | None) -> Iterator[None]:
    """Serialize first use of a SQLite store: two processes must not both create its schema."""
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client() -> MlflowClient:
    """A client of :func:`tracking_uri`, also made the fluent API's store."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _init_lock(_sqlite_path(uri)):  # a client's first use of a new database creates its tables
        return MlflowClient(uri)


def _experiment_id(client: MlflowClient) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    db = _sqlite_path(client.tracking_uri)
    with _init_lock(db):  # two processes must not both create the experiment
        experiment = _retry(client.get_experiment_by_name, name)
        if experiment is None:
            # Artifacts beside the database, not in ./mlruns of a temporary experiment workspace.
            location = (db.parent / ARTIFACTS_DIR).as_uri() if db is not None else None
            log.info("creating MLflow experiment '%s' (artifacts: %s)", name, location or "server default")
            return _retry(client.create_experiment, name, artifact_location=location)
    if experiment.lifecycle_stage != "active":
        raise MlflowException(f"MLflow experiment '{name}' is deleted: restore it or set MLFLOW_EXPERIMENT_NAME")
    return experiment.experiment_id


# --- runs -----------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def run_tags() -> dict[str, str]:
    """Tags of a new run: code version and the DVC experiment/stage that ran it."""
    tags = {"git_commit": _git_commit()}
    for tag, var in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_exp_baseline_rev", "DVC_EXP_BASELINE_REV"),
                     ("dvc_stage", "DVC_STAGE")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def run_exists(run_id: str) -> bool:
    """Whether ``run_id`` is a run in the current tracking store."""
    try:
        _retry(_client().get_run, run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def find_run(tag: str, value: str) -> str | None:
    """The id of a run of the experiment tagged ``tag=value``, or None.

    Among several (the same model trained twice, e.g. ``dvc repro --force``): a run of this DVC
    experiment (DVC_EXP_NAME) first, then a FINISHED one, then the latest started.
    """
    client = _client()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = _retry(client.get_experiment_by_name, name)
    if experiment is None or not re.fullmatch(r"[\w.\-]+", value):
        return None
    runs = _retry(client.search_runs, [experiment.experiment_id], filter_string=f"tags.{tag} = '{value}'",
                  order_by=["attributes.start_time DESC"], max_results=200)
    exp_name = os.environ.get("DVC_EXP_NAME") or None

    def rank(run: Any) -> tuple[bool, bool, int]:
        return (exp_name is not None and run.data.tags.get("dvc_exp_name") == exp_name,
                run.info.status == "FINISHED", run.info.start_time or 0)

    return max(runs, key=rank).info.run_id if runs else None


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def end_orphaned_runs(client: MlflowClient, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (tags ``host``, ``pid``) died on this machine; their ids.

    A stage killed outright (SIGKILL, out of memory, power) cannot end its run, which would then
    stay RUNNING in the UI for ever. Runs of other machines, of live processes, without the tags,
    and ``keep`` (a run about to be resumed) are left alone.
    """
    experiment = _retry(client.get_experiment_by_name, os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    if experiment is None:
        return []
    host = socket.gethostname()
    runs = _retry(client.search_runs, [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                  max_results=1000)
    ended = []
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == keep or tags.get("host") != host or not tags.get("pid", "").isdigit():
            continue
        if not _alive(int(tags["pid"])):
            _retry(client.set_terminated, run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
            log.warning("MLflow run %s: its process %s died without ending it; marked KILLED", run.info.run_id,
                        tags["pid"])
    return ended


@contextlib.contextmanager
def start_run(run_id: str | None = None, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open (or, with ``run_id``, resume) a run; FINISHED on exit, FAILED on an exception.

    A new run is named ``run_name`` (default: the DVC experiment name) and tagged with
    :func:`run_tags`. Every run is tagged with this process (``host``, ``pid``), so that a later
    start can mark it KILLED if the process dies without ending it (:func:`end_orphaned_runs`).
    Exceptions are re-raised.
    """
    client = _client()
    experiment_id = None if run_id else _experiment_id(client)
    end_orphaned_runs(client, keep=run_id)
    name = run_name or (None if run_id else os.environ.get("DVC_EXP_NAME") or None)
    active = _retry(mlflow.start_run, run_id=run_id, experiment_id=experiment_id, run_name=name)
    log.info("MLflow run %s %s in %s", active.info.run_id, "resumed" if run_id else "started", client.tracking_uri)
    status, body_error = "FINISHED", None
    try:
        with active:  # ActiveRun.__exit__ ends the run FINISHED, or FAILED on an exception
            set_tags({"host": socket.gethostname(), "pid": os.getpid()})
            if not run_id:
                set_tags(run_tags())
            try:
                yield active
            except BaseException as err:
                status, body_error = "FAILED", err
                raise
    except Exception as err:
        if err is body_error or not _is_locked(err):
            raise
        # end_run lost the SQLite lock to another process: record the status again.
        _retry(client.set_terminated, active.info.run_id, status)
        if body_error is not None:
            raise body_error from None


def _run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call inside tracking.start_run()")
    return run.info.run_id


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set run tags (values as strings, cut to MLflow's length limit)."""
    items = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        _retry(MlflowClient().log_batch, _run_id(), tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def set_data_tags(manifest_paths: Sequence[str | Path]) -> str:
    """Tag ``data_hash``: sha256 over the files' bytes in the given order; returns it."""
    digest = hashlib.sha256()
    for path in manifest_paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    set_tags({"data_hash": value, "data_files": ",".join(Path(p).as_posix() for p in manifest_paths)})
    return value


def params_to_log(params: Mapping[str, Any]) -> dict[str, str]:
    """params.yaml as flat ``section.key`` strings (lists as ``[a, b]``), cut to MLflow's limit."""
    flat = {}
    for key, value in flatten(params).items():
        text = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            log.warning("param %s is %d characters: logged cut to %d", key, len(text), MAX_PARAM_VAL_LENGTH)
            text = text[:MAX_PARAM_VAL_LENGTH]
        flat[key] = text
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    """Log the params dict flattened. In a resumed run, a param already logged with another
    value cannot change: the new value goes to tag ``param_changed.<key>`` instead."""
    run_id = _run_id()
    logged = _retry(MlflowClient().get_run, run_id).data.params
    new = {k: v for k, v in params_to_log(params).items() if k not in logged}
    changed = {k: v for k, v in params_to_log(params).items() if k in logged and logged[k] != v}
    for key in sorted(changed):
        log.warning("param %s=%s differs from the run's %s: tagged param_changed.%s", key, changed[key],
                    logged[key], key)
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        _retry(MlflowClient().log_batch, run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    if changed:
        set_tags({f"param_changed.{k}": v for k, v in changed.items()})


def metric_key(key: str) -> str:
    """A key MLflow accepts (characters outside ``[A-Za-z0-9_-. /]`` become ``_``)."""
    return _METRIC_KEY_BAD.sub("_", key)


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers to ``{"per_class/<label>/f1": 0.9, ...}``; non-numbers are skipped."""
    flat: dict[str, float] = {}
    for key, value in flatten(metrics, prefix, sep="/").items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[metric_key(key)] = float(value)
        else:
            log.debug("metric %s=%r is not a number: not logged", key, value)
    return flat


def log_metrics(metrics: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Log (nested) metrics flattened with '/', each key prefixed with ``prefix``."""
    flat = flat_metrics(metrics, prefix)
    stamp = int(time.time() * 1000)
    items = [Metric(k, v if math.isfinite(v) else float("nan"), stamp, step or 0) for k, v in flat.items()]
    for i in range(0, len(items), 1000):
        _retry(MlflowClient().log_batch, _run_id(), metrics=items[i : i + 1000])


def log_artifacts(paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    """Log files (under ``artifact_path``) and directories (as ``artifact_path/<dir name>``)."""
    for path in map(Path, paths):
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            _retry(mlflow.log_artifacts, str(path), dest)
        elif path.is_file():
            _retry(mlflow.log_artifact, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log not found: {path}")


# --- Keras ----------------------------------------------------------------------------------


def epoch_logger(prefix: str = "") -> Any:
    """A Keras callback that logs every number in the epoch logs (loss, accuracy, val_*, the
    learning rate as ``lr``), keys prefixed with ``prefix``, with step = the 1-based epoch, as in
    reports/train/history.csv."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            values = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
            if "learning_rate" in values:
                values["lr"] = values.pop("learning_rate")
            if "lr" not in values and self.model is not None:
                with contextlib.suppress(Exception):
                    values["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            log_metrics(values, prefix=prefix, step=epoch + 1)

    return EpochLogger()


def environment_tags() -> dict[str, Any]:
    """What bit-identical training depends on besides params, data and code (measured: the CPU, the
    intra-op thread count, which defaults to the visible cores, and TF_ENABLE_ONEDNN_OPTS)."""
    import platform

    import tensorflow as tf

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    intra = tf.config.threading.get_intra_op_parallelism_threads() or os.environ.get("TF_NUM_INTRAOP_THREADS")
    inter = tf.config.threading.get_inter_op_parallelism_threads() or os.environ.get("TF_NUM_INTEROP_THREADS")
    return {"cpu": cpu, "cpu_cores": cores, "tf_intra_op_threads": intra or f"default ({cores} cores)",
            "tf_inter_op_threads": inter or "default", "tf_onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
            "tensorflow": tf.__version__}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def log_keras_model(model: Any, labels: Sequence[str], name: str = "model") -> None:
    """Log the Keras model (``.keras`` format, pinned requirements, tensor signature) and
    ``labels.json`` (the class order of its outputs)."""
    from importlib.metadata import version

    import mlflow.keras
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = tuple(-1 if d is None else int(d) for d in model.input_shape)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), shape)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(labels)))]),
    )
    requirements = [f"tensorflow-cpu=={version('tensorflow-cpu')}", f"keras=={version('keras')}"]
    _retry(mlflow.keras.log_model, model, name=name, signature=signature, pip_requirements=requirements,
           metadata={"labels": list(labels)})
    _retry(mlflow.log_dict, {"labels": list(labels)}, "labels.json")
