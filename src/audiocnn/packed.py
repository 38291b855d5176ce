"""Many clips' arrays in one file: ``<dir>/<array>.npy`` plus each clip's rows in ``<dir>/index.csv``.

Clip ``id`` is ``array[offset : offset + length]`` of one float32 .npy file of shape
(total rows, width), with ``offset`` and a length column in the folder's index.csv. Two kinds:
the spectrogram stage's ``features.npy`` (rows: frames, width: n_mels; column ``frames``) and
normalize's ``clips.npy`` (rows: samples, width 1; column ``samples``). One file instead of one
per clip keeps DVC's work proportional to bytes, not files: a no-op ``dvc repro`` stats one file
where it stated thousands, and a rerun stage hashes and links one file instead of relinking
every clip. Readers ``pread`` one clip's rows when they need them (memory does not grow with the
data set). Writers either lay the rows out first when every clip's length is known up front
(``create``, then ``RowWriter`` fills them in any order, from any process, with ``pwrite``) or
append clips in order when lengths are only known once computed (``Appender``).

A folder's array may be split into shards: ``features.npy``, ``features.1.npy``, ... read as one
array, their rows one after another in that order (the index's offsets count over all of them;
no clip crosses a shard's end). normalize and spectrogram write them after adding clips: the
previous run's file, hard-linked unchanged, plus one file with only the new clips
(``audiocnn.packcache``), so a run that adds 1% of clips writes 1% of the bytes, and DVC,
which finds an unchanged shard by path, inode and mtime, does not hash it again.
"""

from __future__ import annotations

import bisect
import collections
import errno
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import numpy as np

from audiocnn import fileio
from audiocnn.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from audiocnn import spill

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
DTYPE = np.dtype("<f4")
COPY_CHUNK = 64 << 20  # bytes per pread/pwrite where copy_file_range is not available
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
HEADER_BYTES = 128  # an Appender's .npy header: room for any 2-D shape, 64-byte aligned as numpy writes it


@dataclass(frozen=True)
class Kind:
    """What a packed folder holds: its array file, the index column with each clip's row count, a name for messages."""

    array: str
    length: str
    what: str

    def shard(self, number: int) -> str:
        """The file name of shard ``number``: the array's own name for 0, then ``<stem>.<number>.npy``."""
        stem, dot, suffix = self.array.rpartition(".")
        return self.array if number == 0 else f"{stem}.{number}{dot}{suffix}"


FEATURES = Kind("features.npy", "frames", "features")  # (total frames, n_mels) log-mel dB (spectrogram)
AUDIO = Kind("clips.npy", "samples", "normalized audio")  # (total samples, 1) waveform (normalize)


def shard_paths(folder: str | Path, kind: Kind) -> list[Path]:
    """The shard files of ``folder`` in row order: the array, then ``<stem>.1.npy``, ... while they exist."""
    folder = Path(folder)
    paths = [folder / kind.array]
    while (folder / kind.shard(len(paths))).exists():
        paths.append(folder / kind.shard(len(paths)))
    return paths


def offsets(lengths: Sequence[int]) -> np.ndarray:
    """Each clip's first row when clips are stored one after another: (n,) int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths


def create(path: str | Path, rows: int, width: int) -> int:
    """An all-zero (rows, width) float32 .npy file at ``path`` (sparse until written); return its header size.

    Rows are then written with a ``RowWriter`` at ``header + row * width * 4`` bytes.
    """
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": DTYPE.str, "fortran_order": False,
                                                  "shape": (int(rows), int(width))})
    with open(path, "wb") as handle:
        handle.write(header.getvalue())
        handle.truncate(header.tell() + rows * width * DTYPE.itemsize)
    return header.tell()


def npy_header(rows: int, width: int) -> bytes:
    """The ``HEADER_BYTES``-long .npy (version 1.0) header of a (rows, width) float32 array.

    For the shapes of real data sets it is byte for byte the header ``np.save`` writes; a fixed
    length lets an ``Appender`` write rows before it knows how many there will be.
    """
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (DTYPE.str, rows, width)
    body = text.ljust(HEADER_BYTES - 11) + "\n"
    if len(body) != HEADER_BYTES - 10:
        raise ValueError(f"shape ({rows}, {width}) does not fit a {HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _checked_rows(rows: np.ndarray, width: int, path: str) -> np.ndarray:
    """``rows`` as a C-contiguous (length, width) float32 array; ValueError naming ``path`` for another shape."""
    data = np.ascontiguousarray(rows, dtype=DTYPE)
    if data.ndim != 2 or data.shape[1] != width:
        raise ValueError(f"{path}: rows of shape {data.shape}, expected (length, {width})")
    return data


class Appender:
    """Writes clips' rows one after another into a new (rows, width) float32 .npy file, header last.

    For clips whose lengths are only known once computed (normalize's trimmed audio): ``append``
    returns each clip's offset, ``close`` writes the header with the final row count. A file
    left by a failure has a zero header, which no reader takes for an array.
    """

    def __init__(self, path: str | Path, width: int) -> None:
        self.path, self.width, self.rows = str(path), width, 0
        self.handle = open(self.path, "wb")
        self.handle.write(bytes(HEADER_BYTES))
        self._pending: tuple[str, int, int] | None = None  # spilled rows not copied yet: (path, first row, rows)
        self._spill_fds: dict[str, int] = {}

    def append(self, rows: np.ndarray) -> int:
        """(length, width) float32 ``rows`` after the last clip; return their offset (first row)."""
        self._copy_pending()
        data = _checked_rows(rows, self.width, self.path)
        self.handle.write(memoryview(data).cast("B"))
        offset, self.rows = self.rows, self.rows + data.shape[0]
        return offset

    def append_copy(self, fd: int, position: int, rows: int) -> int:
        """``rows`` rows of this width from the open file ``fd`` at byte ``position`` (kernel copy); their offset.

        A copy that fails midway (OSError) leaves the clip out: the next append overwrites its bytes.
        """
        self._copy_pending()
        self.handle.flush()
        row_bytes = self.width * DTYPE.itemsize
        copy_range(fd, self.handle.fileno(), rows * row_bytes, position, HEADER_BYTES + self.rows * row_bytes)
        offset, self.rows = self.rows, self.rows + rows
        self.handle.seek(HEADER_BYTES + self.rows * row_bytes)
        return offset

    def append_spilled(self, rows: spill.Spilled) -> int:
        """A clip's rows from a pool worker's spill file (``audiocnn.spill``) after the last clip; their offset.

        Copied by the kernel when the next clip does not continue the same file (or on close), so
        the consecutive clips of one worker's task cost one copy. OSError (from this or a later
        call) when the spill file is shorter than announced.
        """
        pending = self._pending
        if pending is not None and pending[0] == rows.path and pending[1] + pending[2] == rows.first:
            self._pending = (pending[0], pending[1], pending[2] + rows.rows)
        else:
            self._copy_pending()
            self._pending = (rows.path, rows.first, rows.rows)
        offset, self.rows = self.rows, self.rows + rows.rows
        return offset

    def _copy_pending(self) -> None:
        if self._pending is None:
            return
        path, first, count = self._pending
        self._pending = None
        fd = self._spill_fds.get(path)
        if fd is None:
            fd = self._spill_fds[path] = os.open(path, os.O_RDONLY)
        self.handle.flush()
        row_bytes = self.width * DTYPE.itemsize
        end = HEADER_BYTES + self.rows * row_bytes  # the pending rows are already counted in self.rows
        copy_range(fd, self.handle.fileno(), count * row_bytes, first * row_bytes, end - count * row_bytes)
        self.handle.seek(end)

    def _close_spills(self) -> None:
        for fd in self._spill_fds.values():
            os.close(fd)
        self._spill_fds.clear()

    def close(self) -> None:
        """Write the header (the array is complete) and close the file."""
        try:
            self._copy_pending()
        except BaseException:
            self.handle.close()  # its header stays zero: never taken for an array
            raise
        finally:
            self._close_spills()
        self.handle.truncate(HEADER_BYTES + self.rows * self.width * DTYPE.itemsize)  # past a failed copy
        self.handle.seek(0)
        self.handle.write(npy_header(self.rows, self.width))
        self.handle.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_spills()
            self.handle.close()


class RowWriter:
    """Writes clips' rows into a file made by ``create`` (one open file for many clips)."""

    def __init__(self, path: str | Path, header: int, width: int) -> None:
        self.path, self.header, self.width = str(path), header, width
        self.fd = os.open(self.path, os.O_WRONLY)

    def write(self, offset: int, rows: np.ndarray) -> None:
        """(frames, width) float32 ``rows`` from row ``offset`` on."""
        data = _checked_rows(rows, self.width, self.path)
        position = self.header + offset * self.width * DTYPE.itemsize
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_range(in_fd: int, out_fd: int, count: int, in_pos: int, out_pos: int) -> None:
    """Copy ``count`` bytes between open files at the given positions (inside the kernel where it can).

    Neither file's position moves. Falls back to pread/pwrite where ``copy_file_range`` is
    refused (another file system, an old kernel); OSError when the source ends early.
    """
    kernel = hasattr(os, "copy_file_range")
    while count:
        done = 0
        if kernel:
            try:
                done = os.copy_file_range(in_fd, out_fd, count, in_pos, out_pos)
            except OSError as err:
                if err.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
        if not kernel:
            data = os.pread(in_fd, min(count, COPY_CHUNK), in_pos)
            done = os.pwrite(out_fd, data, out_pos) if data else 0
        if done <= 0:
            raise OSError(errno.EIO, f"{count} bytes short at byte {in_pos}")
        count, in_pos, out_pos = count - done, in_pos + done, out_pos + done


def read_rows(path: str | Path, header: int, offset: int, length: int, width: int) -> np.ndarray:
    """(length, width) float32 rows from ``offset`` of the array file ``path`` (one ``pread``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _pread_rows(fd, path, header, offset, length, width)
    finally:
        os.close(fd)


def _pread_rows(fd: int, path: str | Path, header: int, offset: int, length: int, width: int) -> np.ndarray:
    """(length, width) float32 (read-only) from the open array file ``fd`` (``path``, for the error): one ``pread``."""
    offset, length = int(offset), int(length)
    nbytes = length * width * DTYPE.itemsize
    data = os.pread(fd, nbytes, header + offset * width * DTYPE.itemsize)
    if len(data) != nbytes:
        raise DataError(f"{path}: rows {offset} to {offset + length} lie beyond the end of the file "
                        "(changed while read?)")
    return np.frombuffer(data, dtype=DTYPE).reshape(length, width)


def write(folder: str | Path, arrays: Mapping[str, np.ndarray], index: "pd.DataFrame | None" = None,
          kind: Kind = FEATURES) -> None:
    """Pack (length, width) arrays by clip id into ``folder`` (the kind's array and index.csv) in one go.

    ``index``: rows with an ``id`` column to which ``offset`` and the length column are added
    (default: just the ids). For small sets (tests, examples); stages write with a ``RowWriter``
    or an ``Appender`` instead, without holding every array.
    """
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = pd.DataFrame({"id": list(arrays)}) if index is None else index.copy()
    chosen = [np.asarray(arrays[clip_id], dtype=DTYPE) for clip_id in index["id"]]
    width = chosen[0].shape[1] if chosen else 0
    index["offset"] = offsets([x.shape[0] for x in chosen])
    index[kind.length] = [x.shape[0] for x in chosen]
    with fileio.atomic_path(folder / kind.array) as tmp:
        with RowWriter(tmp, create(tmp, int(index[kind.length].sum()), width), width) as writer:
            for start, x in zip(index["offset"], chosen):
                writer.write(int(start), x)
    fileio.write_csv(folder / INDEX_NAME, index)


class Packed:
    """The clips of one packed folder, read by id (``clip``) or by (offset, length) (``rows``).

    Its array is one file or several shards (``shard_paths``); offsets count over all of them.
    """

    def __init__(self, folder: str | Path, kind: Kind = FEATURES,
                 index: Mapping[str, Sequence[str]] | None = None) -> None:
        """``index``: the folder's index.csv columns, when already read (else read here)."""
        self.folder, self.kind = Path(folder), kind
        self.paths = shard_paths(self.folder, kind)
        self.path = self.paths[0]
        shards = [_shard_shape(path, kind) for path in self.paths]  # (header bytes, rows, width) each
        widths = {width for _, _, width in shards}
        if len(widths) > 1:
            raise DataError(f"{self.folder}: its {kind.what} shards have different widths {sorted(widths)}")
        self.headers = [header for header, _, _ in shards]
        packed_starts = offsets([rows for _, rows, _ in shards])  # (shards,) each one's first row over all
        self.starts = packed_starts.tolist()
        self.shape = (int(sum(rows for _, rows, _ in shards)), int(shards[0][2]))  # (total rows, width)
        index_path = self.folder / INDEX_NAME
        if index is None:
            try:
                index = fileio.read_columns(index_path, columns=("id", "offset", kind.length))
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {index_path}: {err}") from err
        missing = sorted({"id", "offset", kind.length} - set(index))
        if missing:
            raise DataError(f"{index_path}: missing column(s) {', '.join(missing)}")
        try:
            starts = np.array(index["offset"], dtype=np.int64)  # (clips,)
            lengths = np.array(index[kind.length], dtype=np.int64)  # (clips,)
        except ValueError as err:
            raise DataError(f"{index_path}: offset and {kind.length} must be integers ({err})") from None
        bad = (starts < 0) | (lengths < 1) | (starts + lengths > self.shape[0])
        shard_of = np.searchsorted(packed_starts, starts, side="right") - 1  # (clips,) the shard each starts in
        ends = np.append(packed_starts[1:], self.shape[0])  # (shards,) one past each shard's last row
        bad |= starts + lengths > ends[np.clip(shard_of, 0, None)]
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{index_path}: clip {index['id'][row]} has rows {starts[row]}+{lengths[row]} outside "
                            f"{self._files()} ({self.shape[0]} rows)")
        self.refs = dict(zip(index["id"], zip(starts.tolist(), lengths.tolist())))
        self.fds = [os.open(path, os.O_RDONLY) for path in self.paths]

    def _files(self) -> str:
        return str(self.path) if len(self.paths) == 1 else f"{self.path} and {len(self.paths) - 1} more shard(s)"

    def __del__(self) -> None:
        for fd in getattr(self, "fds", ()):
            os.close(fd)

    @property
    def width(self) -> int:
        return self.shape[1]

    def ref(self, clip_id: str) -> tuple[int, int]:
        """(offset, length) of ``clip_id``; DataError naming the folder when it holds no such clip."""
        try:
            return self.refs[clip_id]
        except KeyError:
            raise DataError(f"no {self.kind.what} for clip {clip_id!r} in {self.folder} "
                            f"(not in its {INDEX_NAME})") from None

    def refs_of(self, clip_ids: Sequence[str]) -> np.ndarray:
        """(n, 2) int64 (offset, length) of each id, e.g. to stream the clips in tf.data."""
        return np.array([self.ref(clip_id) for clip_id in clip_ids], dtype=np.int64).reshape(-1, 2)

    def rows(self, offset: int, length: int) -> np.ndarray:
        """(length, width) float32 (read-only): one ``pread`` (thread-safe; pages stay in the OS cache, not in RSS)."""
        offset = int(offset)
        shard = bisect.bisect_right(self.starts, offset) - 1 if len(self.fds) > 1 else 0
        return _pread_rows(self.fds[shard], self.paths[shard], self.headers[shard], offset - self.starts[shard],
                           length, self.shape[1])

    def clip(self, clip_id: str) -> np.ndarray:
        """One clip's (length, width) float32 rows."""
        return self.rows(*self.ref(clip_id))


def _shard_shape(path: Path, kind: Kind) -> tuple[int, int, int]:
    """(header bytes, rows, width) of one packed .npy file, from its header alone (no pickle, no data read)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            header = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {kind.what} {path}: {err}") from err
    if len(shape) != 2 or dtype != DTYPE or fortran:
        raise DataError(f"{path}: expected a 2-D float32 array of {kind.what}, got {dtype} {shape}")
    if size != header + shape[0] * shape[1] * DTYPE.itemsize:
        raise DataError(f"{path}: {size} bytes, not the {shape} float32 array its header announces (truncated?)")
    return header, int(shape[0]), int(shape[1])


def open_folder(folder: str | Path, kind: Kind = FEATURES) -> Packed:
    """``Packed(folder, kind)``, opened once per process while its files are unchanged (by inode, size and mtime)."""
    return open_stamped(stamp(folder, kind))


class FolderStamp(NamedTuple):
    """A packed folder as it was when stamped: its absolute path, kind, and each file's (inode, size, mtime ns)."""

    folder: str
    kind: Kind
    files: tuple[tuple[int, int, int], ...]  # the array, index.csv, then the further shards while they exist


def stamp(folder: str | Path, kind: Kind = FEATURES) -> FolderStamp:
    """The folder's ``FolderStamp``: a few ``stat`` calls; DataError naming a missing array or index."""
    folder = os.path.abspath(folder)
    files = []
    for name in (kind.array, INDEX_NAME):
        try:
            info = os.stat(os.path.join(folder, name))
        except OSError as err:
            raise DataError(f"cannot read {kind.what} {os.path.join(folder, name)}: {err.strerror or err}") from err
        files.append((info.st_ino, info.st_size, info.st_mtime_ns))
    number = 1
    while True:  # as shard_paths finds them
        try:
            info = os.stat(os.path.join(folder, kind.shard(number)))
        except OSError:
            return FolderStamp(folder, kind, tuple(files))
        files.append((info.st_ino, info.st_size, info.st_mtime_ns))
        number += 1


def open_stamped(folder: FolderStamp, index: Mapping[str, Sequence[str]] | None = None) -> Packed:
    """The folder as stamped, opened once per process, without looking at its files again once open.

    For per-clip work inside a stage: the stage stamps its input once and hands the stamp to
    every task (an input does not change while its stage runs), so a task costs a dict lookup,
    not the ``stat`` calls of ``open_folder``. A stamp not yet open here (a new worker) is opened.
    ``index``: the folder's index.csv columns when the caller has read them already (read once, not twice).
    """
    packed = _OPENED.pop(folder, None)
    if packed is None:
        packed = Packed(folder.folder, folder.kind, index=index)
    _OPENED[folder] = packed  # most recently used last
    while len(_OPENED) > OPEN_FOLDERS:
        _OPENED.popitem(last=False)
    return packed


OPEN_FOLDERS = 8  # packed folders kept open per process (least recently used closed first)
_OPENED: "collections.OrderedDict[FolderStamp, Packed]" = collections.OrderedDict()
