"""The feature cache of packed outputs: whole arrays looked up by clip key in bulk, rows copied by the kernel.

Per-clip cache files (``store.ClipCache``) cost a file creation per computed clip and an open and
read per hit: at 30,000 clips about 3 s of a 6 s cold run and 0.6 s of a warm one, far more than
the rows themselves. So a stage's packed array (``audiocnn.packed``) is cached in two forms under
``<cache dir>/packs/``:

* packs: after a stage completes, its array is kept whole as ``<id>.npy`` (a hard link of the
  output: no copy, no disk until the output is replaced; a copy where links are not possible)
  with ``<id>.keys.npy`` (each clip's sha256 key, 32 bytes, first row and row count, sorted by
  key) and ``<id>.json``, written last (so a pack without it is incomplete), which records the
  array's size and modification time: a pack whose array changed since (an output edited in
  place) is discarded instead of poisoning later runs. ``outputs.txt`` lists the packs of the
  newest ``KEEP`` outputs (one line each, newest first, shard order); those packs and the newest
  ``KEEP`` are kept, the others removed.
* shards: an output may be several files (``packed.shard_paths``). A pack of the latest output
  that still serves at least ``REUSE_FRACTION`` of its rows is linked whole into the next output
  as a shard (``reusable``), in the same place, so the file keeps its name, inode and mtime
  (DVC does not hash it again); only clips from other packs and new clips are written, into one
  new shard. At most ``MAX_SHARDS`` per output: past that the newest shards are merged into the new one.
* journals: while the stage runs, each process appends every clip it computes to its own
  ``journal-*.rows`` (raw rows) and ``journal-*.keys`` (an ENTRY record per clip, written after
  the rows), holding an exclusive ``flock`` on them. A killed or failed run leaves them, and the
  next run finds their clips as it finds a pack's (so it resumes instead of starting over); the
  next successful run deletes every journal nobody holds, as its pack now covers their clips.

A run looks every clip up at once (a sorted search over each pack's keys) and copies runs of
consecutive rows with ``os.copy_file_range`` (inside the kernel, no Python per clip): into rows
laid out in advance (``copy_rows``: the spectrogram stage, whose clip lengths are known) or
appended in order (``append_rows``: normalize, which learns a clip's length from the cache or
by computing it). An entry may carry a stage's own fields besides key, first row and row count
(normalize: the clip's content hash and whether it is silent), so a hit needs no read of its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from audiocnn import fileio, packed, store

log = logging.getLogger(__name__)

KEEP = 2  # outputs per settings hash whose packs are kept: the latest and the one before it
REUSE_FRACTION = 0.5  # a pack is linked into the next output as a shard while at least this share of its rows is used
MAX_SHARDS = 8  # files per output; the pack-shards after the first MAX_SHARDS - 1 are merged into the new shard
OUTPUTS = "outputs.txt"  # the packs of the newest KEEP outputs: one line each (shard order), newest first
ENTRY = np.dtype([("key", "S32"), ("offset", "<i8"), ("length", "<i8")])  # one clip: key, first row, rows
NO_KEY = bytes(32)  # a clip without a sha256 key: never stored, never found
_JOURNAL = "journal-"


@dataclass(frozen=True)
class Pack:
    """One cached array: its file, the bytes before its first row (0 for a journal), its entries sorted by key."""

    array: Path
    header: int
    entries: np.ndarray  # (clips,) ENTRY
    rows: int = 0  # in the array (used or not)
    name: str = ""  # the pack's id; "" for a journal (never a shard: raw rows, no .npy header)


@dataclass(frozen=True)
class Found:
    """Where each looked-up clip lies: ``pack`` (index into ``PackCache.packs``; -1: nowhere) and its entry there."""

    pack: np.ndarray  # (clips,) int64
    offset: np.ndarray  # (clips,) int64: first row in the pack
    length: np.ndarray  # (clips,) int64: rows
    entry: np.ndarray = field(repr=False)  # (clips,) the pack's entry (zeros where not found)


@dataclass(frozen=True)
class Shard:
    """A file of an output linked whole from a pack: its path there, header bytes, rows, and the pack's name."""

    path: str
    header: int
    rows: int
    pack: str


@dataclass(frozen=True)
class Placement:
    """Where each clip of an output lies: in a linked shard (``shard`` < len(shards)) or in the new file."""

    shards: list[Shard]  # linked, in file order
    shard: np.ndarray  # (clips,) int64: index into shards; len(shards): the new file
    local: np.ndarray  # (clips,) int64: first row in a linked shard (0 for the new file's clips)

    @property
    def fresh(self) -> np.ndarray:
        """(clips,) bool: the clips whose rows go into the new file."""
        return self.shard == len(self.shards)

    def offsets(self, local: np.ndarray) -> np.ndarray:
        """(clips,) int64 first rows counted over all the output's files, from each clip's first row in its own file."""
        starts = packed.offsets([s.rows for s in self.shards] + [0])  # (shards + 1,) each file's first row
        return starts[self.shard] + np.asarray(local, np.int64)

    def unlinked(self, found: Found) -> Found:
        """``found`` without the clips of linked shards (what is left to copy into the new file)."""
        return Found(np.where(self.fresh, found.pack, -1), found.offset, found.length, found.entry)


def no_placement(clips: int) -> Placement:
    """Every clip in the new file (no cache, or nothing linked)."""
    return Placement([], np.zeros(clips, np.int64), np.zeros(clips, np.int64))


def entry_dtype(extra: np.dtype | None = None) -> np.dtype:
    """ENTRY followed by a stage's own fields ``extra`` (a structured dtype)."""
    return ENTRY if extra is None else np.dtype(ENTRY.descr + extra.descr)


def key_bytes(keys: Sequence[str]) -> np.ndarray:
    """(n,) S32 raw digests of hex sha256 ``keys``; one that is not a sha256 becomes NO_KEY."""
    return np.array([bytes.fromhex(k) if store.is_sha256(k) else NO_KEY for k in keys], dtype="S32")


def hex_digests(digests: np.ndarray) -> list[str]:
    """(n,) S32 raw digests as hex strings (numpy drops an S32 value's trailing zero bytes; this does not)."""
    text = np.ascontiguousarray(digests, dtype="S32").tobytes().hex()
    return [text[i : i + 64] for i in range(0, len(text), 64)]


class PackCache:
    """The packs and journals of one stage and settings hash (``ClipCache.dir``), arrays ``width`` floats wide.

    ``extra``: the stage's own fields stored with each entry (a structured dtype; None: none).
    """

    def __init__(self, cache: store.ClipCache, width: int, extra: np.dtype | None = None) -> None:
        self.dir = cache.dir / "packs"
        self.width = width
        self.entry = entry_dtype(extra)
        self.row_bytes = width * packed.DTYPE.itemsize
        self.packs: list[Pack] = []
        self.latest = 0  # self.packs[:latest]: the latest output's packs, in shard order

    # --- reading ----------------------------------------------------------------------------------------------

    def load(self) -> list[Pack]:
        """Read every complete, unchanged pack, then every journal; others are removed with a warning.

        Packs come in this order: the latest output's (in shard order, ``self.latest`` of them),
        then the others, newest first; a clip is found in the first that holds it.
        """
        self.packs, self.latest = [], 0
        with contextlib.suppress(FileNotFoundError):
            metas = sorted(self.dir.glob("*.json"), key=_mtime, reverse=True)
            packs = {pack.name: pack for pack in map(self._read_pack, metas) if pack is not None}
            outputs = self.outputs()
            latest = [packs.pop(name) for name in (outputs[0] if outputs else []) if name in packs]
            self.packs, self.latest = latest + list(packs.values()), len(latest)
            self.packs += [pack for pack in map(self._read_journal, sorted(self.dir.glob(f"{_JOURNAL}*.keys")))
                           if pack is not None]
        return self.packs

    def outputs(self) -> list[list[str]]:
        """The pack names of the newest KEEP outputs (newest first, each in shard order); [] when unrecorded."""
        try:
            return [line.split() for line in (self.dir / OUTPUTS).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError):
            return []

    def reusable(self, found: Found) -> list[int]:
        """The latest output's packs (indices into ``packs``, shard order) to link whole into the next output.

        Each serves at least REUSE_FRACTION of its rows to the clips ``found``; at most
        MAX_SHARDS - 1, leaving room for the new file.
        """
        used = np.bincount(found.pack[found.pack >= 0], weights=found.length[found.pack >= 0],
                           minlength=len(self.packs))  # (packs,) rows the new output takes from each
        chosen = [number for number in range(self.latest)
                  if self.packs[number].rows and used[number] >= REUSE_FRACTION * self.packs[number].rows]
        return chosen[: MAX_SHARDS - 1]

    def link(self, found: Found, folder: Path, kind: packed.Kind) -> list[Shard]:
        """Hard-link the ``reusable`` packs into the output ``folder`` as its first files (``kind.shard(k)``).

        Stops at the first pack that cannot be linked (another file system): its clips, and the
        next packs', are then copied into the new file.
        """
        shards: list[Shard] = []
        for number in self.reusable(found):
            pack = self.packs[number]
            path = folder / kind.shard(len(shards))
            try:
                os.link(pack.array, path)
            except OSError as err:
                log.info("feature cache: cannot link %s into %s (%s): copying its clips", pack.array, folder, err)
                break
            shards.append(Shard(str(path), pack.header, pack.rows, pack.name))
        return shards

    def place(self, found: Found, shards: list[Shard]) -> Placement:
        """Each found clip in the linked ``shards`` keeps its rows there; the others go to the new file."""
        shard = np.full(found.pack.size, len(shards), np.int64)
        local = np.zeros(found.pack.size, np.int64)
        numbers = {pack.name: number for number, pack in enumerate(self.packs) if pack.name}
        for k, linked in enumerate(shards):
            mine = found.pack == numbers.get(linked.pack, -2)
            shard[mine], local[mine] = k, found.offset[mine]
        return Placement(shards, shard, local)

    def _read_pack(self, meta_path: Path) -> Pack | None:
        name = meta_path.name[: -len(".json")]
        array, keys = self.dir / f"{name}.npy", self.dir / f"{name}.keys.npy"
        reading = meta_path  # the file a failure is reported on
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            reading = array
            stat = array.stat()
            if (stat.st_size, stat.st_mtime_ns) != (meta["size"], meta["mtime_ns"]):
                return self._discard(name, f"{array} changed since it was kept (size or mtime)")
            reading = keys
            entries = fileio.load_npy(keys)
            if meta["width"] != self.width or entries.dtype != self.entry or entries.ndim != 1:
                return self._discard(name, f"{keys} does not describe rows of width {self.width}")
            return self._checked(Pack(array, int(meta["header"]), entries, name=name), stat.st_size, name)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return self._discard(name, f"{reading}: unreadable pack ({err})")

    def _read_journal(self, keys: Path) -> Pack | None:
        name = keys.name[: -len(".keys")]
        array = self.dir / f"{name}.rows"
        try:
            data = keys.read_bytes()
            entries = np.frombuffer(data, self.entry, count=len(data) // self.entry.itemsize)  # torn last: ignored
            size = array.stat().st_size
        except OSError as err:
            log.warning("feature cache: cannot read journal %s (%s): skipped", keys, err)
            return None
        rows = size // self.row_bytes
        whole = entries[entries["offset"] + entries["length"] <= rows]  # records whose rows were written
        return Pack(array, 0, np.sort(whole, order=["key", "offset"])) if whole.size else None

    def _checked(self, pack: Pack, size: int, name: str) -> Pack | None:
        rows = (size - pack.header) // self.row_bytes
        if pack.entries.size and int((pack.entries["offset"] + pack.entries["length"]).max()) > rows:
            return self._discard(name, f"{pack.array}: entries beyond its {rows} rows")
        return dataclasses.replace(pack, rows=rows)

    def _discard(self, name: str, reason: str) -> None:
        log.warning("feature cache: %s: pack removed", reason)
        self._remove(name)
        return None

    def _remove(self, name: str) -> None:
        for suffix in (".json", ".keys.npy", ".npy"):  # the completion marker first
            with contextlib.suppress(OSError):
                os.unlink(self.dir / f"{name}{suffix}")

    def find(self, keys: Sequence[str], lengths: Sequence[int] | None = None) -> Found:
        """Each clip (hex sha256 ``keys``) in the first pack that holds it (with that length, given ``lengths``)."""
        wanted = key_bytes(keys)
        entries = np.zeros(wanted.size, self.entry)
        found = Found(np.full(wanted.size, -1, np.int64), entries["offset"], entries["length"], entries)
        for number, pack in enumerate(self.packs):
            missing = np.flatnonzero((found.pack < 0) & (wanted != NO_KEY))
            if not missing.size or not pack.entries.size:
                continue
            at = np.minimum(np.searchsorted(pack.entries["key"], wanted[missing]), pack.entries.size - 1)
            entry = pack.entries[at]
            same = entry["key"] == wanted[missing]
            if lengths is not None:
                same &= entry["length"] == np.asarray(lengths, dtype=np.int64)[missing]
            found.pack[missing[same]] = number
            entries[missing[same]] = entry[same]
        return found

    def copy_rows(self, found: Found, dest: str, dest_header: int, dest_offsets: Sequence[int],
                  lengths: Sequence[int]) -> np.ndarray:
        """Copy every found clip's rows into the array file ``dest`` at ``dest_offsets``; (clips,) bool: copied.

        Clips that follow one another in the output and in their pack are copied in one call. A
        pack that cannot be read is discarded and its clips are not copied.
        """
        dest_offsets, lengths = np.asarray(dest_offsets, np.int64), np.asarray(lengths, np.int64)
        copied = found.pack >= 0
        hits = np.flatnonzero(copied)  # in the output's order
        if not hits.size:
            return copied
        pack, src, dst, n = found.pack[hits], found.offset[hits], dest_offsets[hits], lengths[hits]
        starts, ends = _copy_runs(pack, src, n, dst)
        rows = np.add.reduceat(n, starts)  # per run of consecutive clips
        out_fd = os.open(dest, os.O_WRONLY)
        try:
            for number in np.unique(pack):
                runs = np.flatnonzero(pack[starts] == number)
                source = self.packs[number]
                try:
                    in_fd = os.open(source.array, os.O_RDONLY)
                    try:
                        for run in runs:
                            packed.copy_range(in_fd, out_fd, int(rows[run]) * self.row_bytes,
                                              source.header + int(src[starts[run]]) * self.row_bytes,
                                              dest_header + int(dst[starts[run]]) * self.row_bytes)
                    finally:
                        os.close(in_fd)
                except OSError as err:
                    self._copy_failed(source, err)
                    for run in runs:
                        copied[hits[starts[run]:ends[run]]] = False
        finally:
            os.close(out_fd)
        return copied

    def append_rows(self, found: Found, clips: np.ndarray, appender: packed.Appender) -> list[int]:
        """Append found ``clips`` (indices, in order) to ``appender``; their offsets there, stopping at the first failure.

        Clips that follow one another in their pack are copied in one call. A pack that cannot be
        read is discarded; the clips from the failed one on are not appended (the caller computes them).
        """
        pack, src, n = found.pack[clips], found.offset[clips], found.length[clips]
        offsets: list[int] = []
        for start, end in zip(*_copy_runs(pack, src, n)):
            source = self.packs[int(pack[start])]
            try:
                with open(source.array, "rb", buffering=0) as handle:
                    first = appender.append_copy(handle.fileno(), source.header + int(src[start]) * self.row_bytes,
                                                 int(n[start:end].sum()))
            except OSError as err:
                self._copy_failed(source, err)
                break
            offsets += (first + np.concatenate([[0], np.cumsum(n[start:end - 1])])).tolist()
        return offsets

    def _copy_failed(self, source: Pack, err: OSError) -> None:
        """A pack (not a journal: header 0) whose rows could not be copied is removed; its clips are recomputed."""
        log.warning("feature cache: cannot copy from %s (%s): recomputing its clips", source.array, err)
        if source.header:
            self._remove(source.array.name[: -len(".npy")])

    def open_journal(self) -> Journal | None:
        """A journal of this process in the packs folder, with this cache's entry fields (close it when done)."""
        return open_journal(self.dir, self.width, self.entry)

    # --- writing ----------------------------------------------------------------------------------------------

    def keep(self, array: Path | None, header: int, keys: Sequence[str], offsets: Sequence[int],
             lengths: Sequence[int], extra: np.ndarray | None = None, reused: Sequence[str] = ()) -> None:
        """Keep the complete packed ``array`` (clips: hex sha256 ``keys``, first rows, row counts) as the newest pack.

        ``extra``: (clips,) the entry fields of this cache's ``extra`` dtype. ``reused``: the names
        of the packs linked as the output's first shards (``reusable``); ``array`` (None: none) is
        its last. The output's packs go first in ``outputs.txt``; packs of no recorded output
        beyond the newest KEEP are removed, and every journal no running process holds. Clips
        without a sha256 key are left out. A failure only logs: the cache is optional.
        """
        entries = np.zeros(len(keys), self.entry)
        entries["key"], entries["offset"], entries["length"] = key_bytes(keys), offsets, lengths
        for name in extra.dtype.names if extra is not None else ():
            entries[name] = extra[name]
        entries = np.sort(entries[entries["key"] != NO_KEY], order=["key", "offset"])
        shards = list(reused)
        try:
            if array is not None and entries.size:  # (without keys there is nothing to find it by)
                shards.append(self._keep_array(array, header, entries))
            if not shards:
                return
            outputs = [shards] + [names for names in self.outputs() if names != shards]
            with fileio.atomic_path(self.dir / OUTPUTS) as tmp:
                tmp.write_text("".join(" ".join(names) + "\n" for names in outputs[:KEEP]), encoding="utf-8")
            wanted = {name for names in outputs[:KEEP] for name in names}
            for old in sorted(self.dir.glob("*.json"), key=_mtime, reverse=True)[KEEP:]:
                if old.name[: -len(".json")] not in wanted:
                    self._remove(old.name[: -len(".json")])
            self._remove_idle_journals()
        except OSError as err:
            log.warning("feature cache: cannot keep %s in %s (%s)", array, self.dir, err)

    def _keep_array(self, array: Path, header: int, entries: np.ndarray) -> str:
        """Link (or copy) ``array`` in as the pack of ``entries`` (sorted ENTRY records); its name."""
        name = hashlib.sha256(entries.tobytes() + str(self.width).encode()).hexdigest()[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / f"{name}.json"
        if meta.exists() and self._read_pack(meta) is not None:
            os.utime(meta)  # the same clips at the same rows, already kept: now the newest
            return name
        self._remove(name)
        kept = self.dir / f"{name}.npy"
        try:
            os.link(array, kept)
        except OSError:
            shutil.copyfile(array, kept)
        fileio.write_npy(self.dir / f"{name}.keys.npy", entries)
        stat = kept.stat()
        fileio.write_json(meta, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header": header,
                                 "width": self.width, "clips": int(entries.size)})
        return name

    def _remove_idle_journals(self) -> None:
        for keys in self.dir.glob(f"{_JOURNAL}*.keys"):
            try:
                fd = os.open(keys, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a process still writing it: keep
                for path in (keys, keys.with_suffix(".rows")):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            except OSError:
                pass
            finally:
                os.close(fd)


class Journal:
    """This process's journal in one packs folder: computed clips appended (rows, then their entry record).

    A failed append (a full disk) logs and stops the journal: the cache is optional, the run goes on.
    """

    def __init__(self, folder: Path, width: int, entry: np.dtype = ENTRY) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stem = stem = folder / f"{_JOURNAL}{os.getpid()}-{secrets.token_hex(4)}"
        self.keys_fd = os.open(f"{stem}.keys", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(self.keys_fd, fcntl.LOCK_EX)
        self.rows_fd = os.open(f"{stem}.rows", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.width, self.entry, self.rows, self.open = width, entry, 0, True

    def append(self, key: str, rows: np.ndarray, extra: tuple = ()) -> None:
        """(length, width) float32 ``rows`` of the clip with hex sha256 ``key``; ``extra``: its own entry fields."""
        if not self.open:
            return
        data = np.ascontiguousarray(rows, dtype=packed.DTYPE)
        record = np.array([(bytes.fromhex(key), self.rows, data.shape[0], *extra)], self.entry)
        try:
            _write_all(self.rows_fd, memoryview(data).cast("B"))
            _write_all(self.keys_fd, record.tobytes())
        except OSError as err:
            log.warning("feature cache: cannot append to %s.* (%s): stopped caching computed clips", self.stem, err)
            self.close()
            return
        self.rows += data.shape[0]

    def close(self) -> None:
        if self.open:
            self.open = False
            os.close(self.rows_fd)
            os.close(self.keys_fd)  # releases the lock


def open_journal(folder: Path, width: int, entry: np.dtype = ENTRY) -> Journal | None:
    """A new journal of this process in ``folder``; None (with a warning) when it cannot be created.

    The run then goes on without caching the clips it computes.
    """
    try:
        return Journal(folder, width, entry)
    except OSError as err:
        log.warning("feature cache: cannot open a journal in %s (%s): computed clips not cached", folder, err)
        return None


_journals: dict[tuple[int, str], Journal | None] = {}  # (pid, folder) -> this process's journal (None: failed)


def journal_append(folder: Path, key: str, rows: np.ndarray, entry: np.dtype = ENTRY, extra: tuple = ()) -> None:
    """Append a computed clip to this process's journal in ``folder`` (opened on first use); failures only log.

    ``entry``: the cache's entry dtype (``PackCache.entry``), ``extra``: the clip's values of its own fields.
    """
    if not store.is_sha256(key):
        return
    slot = (os.getpid(), str(folder))  # a forked worker must not write its parent's journal
    if slot not in _journals:
        _journals[slot] = open_journal(folder, rows.shape[1], entry)
    journal = _journals[slot]
    if journal is not None:
        journal.append(key, rows, extra)


def close_journal(folder: Path) -> None:
    """Close this process's journal in ``folder`` (its clips stay for ``load``; the lock is released)."""
    journal = _journals.pop((os.getpid(), str(folder)), None)
    if journal is not None:
        journal.close()


def _copy_runs(pack: np.ndarray, src: np.ndarray, n: np.ndarray,
               dst: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of runs of clips that follow one another in one pack (and in ``dst``), each one copy.

    ``pack``, ``src`` (first row in the pack), ``n`` (rows), ``dst`` (first row in the output): (clips,).
    """
    apart = (pack[1:] != pack[:-1]) | (src[1:] != src[:-1] + n[:-1])
    if dst is not None:
        apart |= dst[1:] != dst[:-1] + n[:-1]
    starts = np.flatnonzero(np.concatenate([[True], apart]))
    return starts, np.append(starts[1:], pack.size)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _write_all(fd: int, view: memoryview | bytes) -> None:
    view = memoryview(view)
    while view:
        view = view[os.write(fd, view):]
