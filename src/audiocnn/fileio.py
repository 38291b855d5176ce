"""Atomic writes: an output is either complete or absent, never half-written.

Every file is written to a temporary sibling and renamed into place, so a stage
killed mid-write leaves no file that a later run could take as finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)


class OutputError(OSError):
    """An output path cannot be written (disk full, permissions, not a directory)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as stable, sorted, indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as handle:
        return json.load(handle)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Save one array as .npy atomically (no pickle)."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load a .npy array; pickled objects are refused."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_csv(path: str | Path, frame: "Any") -> None:
    """Write a pandas DataFrame as CSV (UTF-8, no index), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def read_csv(path: str | Path) -> "Any":
    """Read a CSV written by this pipeline: every column as text, empty stays ''."""
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")


def fresh_dir(path: str | Path) -> Path:
    """Create an empty output directory (removing an old one); clear error if impossible."""
    path = Path(path)
    try:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"cannot create output directory {path}: {err.strerror or err}") from err
    return path
