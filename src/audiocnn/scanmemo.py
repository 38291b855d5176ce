"""Ingest's memo of source files it has decoded: unchanged files are not decoded or hashed again.

A file counts as unchanged when its size, modification time (ns) and inode are those
recorded, the test git's index and DVC's state use, so adding 1% new recordings to a
large source decodes and hashes only those. As in git, a file modified within
``RACY_SECONDS`` of the scan is not recorded (a rewrite in the same clock tick would keep
its mtime). One JSON file per source folder under the cache root ($AUDIOCNN_CACHE_DIR,
``off`` disables it), keyed also by this code and audio.py; written atomically at the end
of ingest. A memo that does not load is ignored (every file is decoded again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import astuple
from pathlib import Path

from audiocnn import audio, fileio, store
from audiocnn.audio import AudioScan

log = logging.getLogger(__name__)

RACY_SECONDS = 2.0  # files modified this recently are scanned but not memoized
ENTRY_FIELDS = 9  # size, mtime_ns, inode, the 5 AudioScan fields, sha256


class ScanMemo:
    """path -> (size, mtime_ns, inode, AudioScan, sha256 or "") of the files of one source folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        self.started_ns = time.time_ns()
        self.hits = 0

    @classmethod
    def for_source(cls, source: Path) -> ScanMemo | None:
        """The memo of ``source`` under the cache root, loaded when present; None when the cache is off."""
        root = store.cache_root()
        if root is None:
            return None
        key = hashlib.sha256(str(Path(source).resolve()).encode("utf-8"))
        key.update(store.source_digest(sys.modules[__name__], audio).encode("ascii"))
        memo = cls(root / "ingest" / f"{key.hexdigest()[:16]}.json")
        try:
            memo.entries = dict(fileio.read_json(memo.path)["files"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ingest memo %s does not load (%s): decoding every file", memo.path, err)
        return memo

    def get(self, file: str, st: os.stat_result) -> tuple[AudioScan, str] | None:
        """The recorded (scan, sha256) of ``file`` when its stat matches, else None."""
        entry = self.entries.get(file)
        if not isinstance(entry, list) or len(entry) != ENTRY_FIELDS or entry[:3] != [st.st_size, st.st_mtime_ns,
                                                                                       st.st_ino]:
            return None  # unknown, changed, or an entry this code did not write
        try:
            scan = AudioScan(*entry[3:8])
        except TypeError:
            return None
        self.hits += 1
        return scan, str(entry[8])

    def put(self, file: str, st: os.stat_result, scan: AudioScan, sha256: str) -> None:
        """Record ``file`` (``st`` taken before decoding it) unless it was modified too recently to trust."""
        if self.started_ns - st.st_mtime_ns < RACY_SECONDS * 1e9:
            self.entries.pop(file, None)
            return
        self.entries[file] = [st.st_size, st.st_mtime_ns, st.st_ino, *astuple(scan), sha256]

    def save(self, files: set[str]) -> None:
        """Write the entries of ``files`` (this run's candidates) atomically; a failure only logs."""
        kept = {f: e for f, e in self.entries.items() if f in files}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_text(self.path, json.dumps({"files": kept}, separators=(",", ":")))
        except OSError as err:
            log.warning("cannot write the ingest memo %s (%s): the next ingest decodes every file", self.path, err)
