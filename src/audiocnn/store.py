"""Where per-clip outputs go: a stage's output folder, completed atomically, and the feature cache.

``staged_dir`` builds a whole output folder under a temporary sibling name and renames it
into place only when every file is written, so files inside need no temp file each (one
``open``/``write`` per clip instead of mkstemp + chmod + rename): a killed stage leaves no
folder under the output's name, only a ``.<name>.*.tmp`` sibling that the next run removes.

``ClipCache`` keeps a copy of each clip's result under
``<root>/<stage>/<settings hash>/<key[:2]>/<key><suffix>`` (root: $AUDIOCNN_CACHE_DIR, default
``.cache/audiocnn`` in the working directory; ``off`` disables it). ``key`` names the clip's
input content (a sha256), the settings hash everything else the result depends on (params,
the stage's own source code, library versions), so a hit is the result the stage would
compute. Entries are written atomically; a stage validates what it reads back and
recomputes an entry that does not load or has the wrong shape. Per-clip outputs (the
spectrogram stage's PNGs) and their entries are hard links of one another where possible (no
second copy on disk, one syscall instead of a file creation); either name can be removed
without affecting the other, and stages never write into an existing file, so DVC sees
complete, ordinary outputs either way. Each stage keeps its ``KEEP_SETTINGS`` most recently used
settings folders: every code or params change makes a new one, and without a bound they pile up
(at 30,000 clips a spectrogram folder holds two 430 MB arrays). A run holds a shared ``flock``
on its folder's ``.in-use`` file (and touches it: the folder's last use) until it closes the
cache; an older folder is removed only under an exclusive lock, so never while a run uses it.
Packed outputs (``audiocnn.packed``: normalize's clips, the spectrogram stage's features) are
cached as whole packed arrays instead (``audiocnn.packcache``), which costs no file per clip.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np

from audiocnn.fileio import OutputError

log = logging.getLogger(__name__)

CACHE_ENV = "AUDIOCNN_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(".cache") / "audiocnn"
DISABLED = {"off", "none", "0", "false"}
KEEP_SETTINGS = 4  # settings folders kept per stage: the most recently used (older ones removed when idle)
IN_USE = ".in-use"  # a settings folder's lock file: shared flock while a run uses the folder, mtime = last use
CLIP_HASH_COLUMN = "clip_sha256"  # normalize's index.csv: sha256 of the clip's float32 samples (``sha256``: the source file's)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out``.

    ``out`` and any ``.<name>.*.tmp`` left by a killed run are removed first, so a
    half-built folder is never found under the output's name. On an exception the
    temporary folder is removed and ``out`` stays absent.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual mode
    except OSError as err:
        raise OutputError(f"cannot create output directory {out}: {err.strerror or err}") from err
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(f"cannot write {out}: {err.strerror or err}") from err
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file with one open/write/close (inside a ``staged_dir``: no temp file needed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_bytes(path: str) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        return handle.readall()


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of ``array`` (what ``np.save`` writes, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def source_digest(*modules: Any) -> str:
    """sha256 of the modules' source files: a code change invalidates the cache, as it reruns DVC."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def is_sha256(key: str) -> bool:
    """Whether ``key`` is a sha256 hex digest (a usable cache key; hand-made indexes may hold anything)."""
    return _SHA256_HEX.fullmatch(key) is not None


def lowercase_keys(values: Sequence[Any]) -> list[str]:
    """Hash columns as cache keys, lower case; a value already so is kept, not copied (64-character
    strings, one per clip: a copy of each would be 3.4 MB at 30,000 clips)."""
    return [value if isinstance(value, str) and (value.islower() or not value) else str(value).lower()
            for value in values]


@contextlib.contextmanager
def held(cache: ClipCache | None) -> Iterator[ClipCache | None]:
    """``cache`` prepared (its settings folder held) for the block, released after; None passes through."""
    if cache is None:
        yield None
        return
    with cache:
        yield cache


def _last_use(folder: Path) -> int:
    """When a settings folder was last used (its ``.in-use`` file's mtime; the folder's for one without it)."""
    for path in (folder / IN_USE, folder):
        with contextlib.suppress(OSError):
            return path.stat().st_mtime_ns
    return 0


def cache_root(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache root from $AUDIOCNN_CACHE_DIR (default ``.cache/audiocnn``); None when it is ``off``."""
    value = (os.environ if environ is None else environ).get(CACHE_ENV, "")
    if value.strip().lower() in DISABLED:
        return None
    return Path(value) if value.strip() else DEFAULT_CACHE_DIR


class ClipCache:
    """Content-addressed per-clip files of one stage under one settings hash (see the module doc)."""

    def __init__(self, root: str | Path, stage: str, settings: Mapping[str, Any]) -> None:
        text = json.dumps(settings, sort_keys=True, default=str)
        self.settings_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        self.root = Path(root)
        self.dir = self.root / stage / self.settings_hash
        self._lock: IO[bytes] | None = None  # the shared flock on dir/.in-use while prepared

    @classmethod
    def from_env(cls, stage: str, settings: Mapping[str, Any]) -> ClipCache | None:
        root = cache_root()
        return None if root is None else cls(root, stage, settings)

    def prepare(self) -> None:
        """Hold this settings folder (``close`` releases it), create its folders, remove idle old settings.

        The root gets a ``.gitignore`` of ``*``. Call once, before workers start (forked workers
        share the hold).
        """
        try:
            self._hold()
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                write_bytes(str(ignore), b"# audiocnn feature cache: never committed\n*\n")
            for a in "0123456789abcdef":
                for b in "0123456789abcdef":
                    (self.dir / (a + b)).mkdir(exist_ok=True)
        except OSError as err:
            self.close()
            raise OutputError(f"cannot create the feature cache {self.dir}: {err.strerror or err} "
                              f"(set {CACHE_ENV}=off to run without it)") from err
        self._remove_old_settings()

    def close(self) -> None:
        """Release the hold on this settings folder (it may then be removed as an old one)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()

    def __enter__(self) -> ClipCache:
        self.prepare()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker gets the paths, not the lock
        return {**self.__dict__, "_lock": None}

    def _hold(self) -> None:
        """Take a shared lock on ``dir/.in-use`` and mark the folder used now.

        A lock taken on a file that a concurrent ``_remove_old_settings`` has meanwhile moved
        away is dropped and taken again on a new folder.
        """
        self.close()
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / IN_USE
            try:
                lock = open(path, "ab")  # noqa: SIM115 (held until close)
            except FileNotFoundError:  # the folder was removed as an old one just now: made again
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_SH)
                if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                    os.utime(path)
                    self._lock = lock
                    return
            except FileNotFoundError:
                pass
            except BaseException:
                lock.close()
                raise
            lock.close()

    def _remove_old_settings(self) -> None:
        """Remove this stage's settings folders beyond the KEEP_SETTINGS most recently used, unless in use.

        A folder is claimed with an exclusive lock on its ``.in-use`` (refused while any run holds
        it), renamed out of the way, released, then deleted; leftovers of a killed removal go too.
        """
        stage_dir = self.dir.parent
        try:
            folders = [f for f in stage_dir.iterdir() if f.is_dir() and not f.name.startswith(".")]
        except OSError:
            return
        for trash in stage_dir.glob(".*.removing"):
            shutil.rmtree(trash, ignore_errors=True)
        folders.sort(key=_last_use, reverse=True)
        for folder in [f for f in folders if f != self.dir][KEEP_SETTINGS - 1:]:
            try:
                lock = open(folder / IN_USE, "ab")  # noqa: SIM115
            except OSError:
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                trash = stage_dir / f".{folder.name}.removing"
                os.rename(folder, trash)
            except OSError:  # in use (or gone meanwhile): kept
                continue
            finally:
                lock.close()
            log.info("feature cache: removed %s (not among the %d most recently used settings of this stage)",
                     folder, KEEP_SETTINGS)
            shutil.rmtree(trash, ignore_errors=True)

    def path(self, key: str, suffix: str) -> str:
        key = key.lower()
        return os.path.join(self.dir, key[:2], key + suffix)

    def get(self, key: str, suffix: str) -> bytes | None:
        """The entry's bytes, or None when there is none (the caller validates them)."""
        try:
            return read_bytes(self.path(key, suffix))
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("feature cache: cannot read %s (%s): recomputing", self.path(key, suffix), err)
            return None

    def put(self, key: str, suffix: str, data: bytes, written: str | None = None) -> None:
        """Store ``data`` atomically; ``written``: a complete file holding it, hard-linked instead of copied.

        A link appears whole or not at all, so it needs no temp file; where links are not
        possible (another file system) the bytes are written to a temp file and renamed.
        A failure only logs: the cache is optional.
        """
        final = self.path(key, suffix)
        if written is not None:
            try:
                os.link(written, final)
                return
            except FileExistsError:  # stored meanwhile by another worker or run: same content
                return
            except OSError:
                pass
        tmp = f"{final}.{os.getpid()}.tmp"
        try:
            write_bytes(tmp, data)
            os.replace(tmp, final)
        except OSError as err:
            log.warning("feature cache: cannot write %s (%s)", final, err)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def place_unread(self, key: str, suffix: str, dest: str, size: int | None = None, tail: bytes = b"") -> bool:
        """Put an entry at ``dest`` without reading it (a hard link, else a file copy); False when there is none.

        The cheap check of a hit that is not read: an entry whose size is not ``size`` or that
        does not end with ``tail`` is discarded (False). Entries are written whole (link or
        rename), so a wrong size or ending only comes from damage after the fact.
        """
        entry = self.path(key, suffix)
        try:
            found = os.stat(entry).st_size
            if size is not None and found != size:
                self.discard(key, suffix, f"{found} bytes, not {size}")
                return False
            if tail:
                with open(entry, "rb", buffering=0) as handle:
                    handle.seek(max(0, found - len(tail)))
                    if handle.read() != tail:
                        self.discard(key, suffix, "truncated")
                        return False
        except FileNotFoundError:
            return False
        except OSError as err:
            log.warning("feature cache: cannot read %s (%s): recomputing", entry, err)
            return False
        try:
            os.link(entry, dest)
        except OSError:
            try:
                shutil.copyfile(entry, dest)
            except OSError as err:
                log.warning("feature cache: cannot copy %s to %s (%s): recomputing", entry, dest, err)
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                return False
        return True

    def discard(self, key: str, suffix: str, reason: str) -> None:
        """Remove a corrupt entry (it is then recomputed and stored again)."""
        log.warning("feature cache: %s is %s: recomputing", self.path(key, suffix), reason)
        with contextlib.suppress(OSError):
            os.unlink(self.path(key, suffix))
