"""Find the candidate clips under a source folder, per ``ingest.layout``.

Each layout turns the source into a list of ``Candidate`` (path, label, group, fold):

- ``folders``: ``<source>/<class>/**/*.<ext>``; the first folder below the source is the label.
- ``csv``: the rows of ``<source>/<ingest.csv>`` (columns path, label[, fold, group]).
- ``pattern``: every ``*.<ext>`` under the source whose file NAME fully matches ``ingest.pattern``
  (``re.fullmatch``: the regex describes the whole name, extension included).

Problems that are clear before decoding (no label, a path that escapes the source,
a csv row naming a missing file) travel as ``Candidate.problem`` so that ingest
reports them; nothing is dropped silently. Walking the tree: entries are sorted,
hidden entries (name starting with '.') are skipped and counted in the log, symlinked
folders are not descended (their target is walked under its own name when it lies
inside the source, so symlink loops cannot hang), and any symlink resolving outside
the source is rejected as ``outside_source``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from audiocnn.errors import DataError

if TYPE_CHECKING:
    from audiocnn.ingest import IngestParams

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "label", "fold", "group")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One file that should become a clip, or the reason it cannot (``problem``, 'code: detail').

    One per source file, all held while ingest decodes them: slots, a plain string ``file`` and
    one shared string per label keep it at about 270 bytes (600 with a dict and a ``Path``).
    """

    path: str  # relative to the source, '/'-separated: the manifest's path
    file: str | None  # what to open (the source joined with ``path``); None when ``problem`` is set
    label: str = ""
    group: str = ""
    fold: str = ""
    problem: str = ""


def discover(source: Path, params: IngestParams) -> list[Candidate]:
    """All candidates under ``source`` for ``params.layout``, in a deterministic order."""
    if params.layout == "csv":
        return from_csv(source, params.csv)
    files = walk(source, params.extensions)
    if params.layout == "folders":
        return [_folder_label(c) for c in files]
    regex = re.compile(params.pattern)
    return [_pattern_label(c, regex) for c in files]


def walk(source: Path, extensions: tuple[str, ...]) -> list[Candidate]:
    """Every file under ``source`` whose name ends in one of ``extensions`` (case-insensitive), sorted by path."""
    suffixes = tuple(f".{ext.lower()}" for ext in extensions)
    real_root = os.path.realpath(source)
    found: list[Candidate] = []
    hidden: list[str] = []
    other: list[str] = []  # files without an audio extension: not candidates, but counted
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(source / rel_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            found.append(Candidate(_display(rel_dir), None, problem=f"unreadable: cannot list folder: {err.strerror}"))
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name.startswith("."):
                hidden.append(rel)
                continue
            is_audio = entry.name.lower().endswith(suffixes)
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                is_dir = os.path.isdir(real)
                if not _inside(real, real_root):
                    if is_audio or is_dir:
                        found.append(Candidate(_display(rel), None, problem=f"outside_source: resolves to {real}"))
                    continue
                if is_dir:
                    log.debug("not following %s: symlink to a folder inside the source (%s)", rel, real)
                    continue
            elif entry.is_dir(follow_symlinks=False):
                pending.append(rel)
                continue
            if not is_audio:
                other.append(rel)
                continue
            if _display(rel) != rel:
                found.append(Candidate(_display(rel), None, problem="unreadable: file name is not valid UTF-8"))
            else:
                found.append(Candidate(rel, entry.path))
    if hidden:
        log.info("skipped %d hidden entries under %s (e.g. %s)", len(hidden), source, ", ".join(hidden[:3]))
    if other:
        log.info("ignored %d file(s) without an audio extension (%s) under %s, e.g. %s", len(other),
                 ", ".join(extensions), source, ", ".join(map(_display, other[:3])))
    return sorted(found, key=lambda c: c.path)


def from_csv(source: Path, csv_name: str) -> list[Candidate]:
    """The rows of the metadata file ``source/csv_name`` as candidates (paths relative to ``source``)."""
    table = _read_metadata(source / csv_name)
    real_root = os.path.realpath(source)
    found: list[Candidate] = []
    for number, row in enumerate(table.itertuples(index=False), start=1):
        label, group, fold = (sys.intern(str(getattr(row, key, "")).strip()) for key in ("label", "group", "fold"))
        found.append(_csv_row(source, real_root, row.path, number, label, group, fold))
    return _csv_duplicates(found)


def _read_metadata(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"ingest.csv: metadata file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"ingest.csv: cannot read metadata file {path}: {err}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    extra = [c for c in table.columns if c not in CSV_COLUMNS]
    if extra:
        log.info("%s: ignoring column(s) %s", path, ", ".join(extra))
    return table


def _csv_row(source: Path, real_root: str, raw: str, number: int, label: str, group: str, fold: str) -> Candidate:
    where = f"csv row {number}"
    if raw.strip() == "":
        return Candidate(raw, None, problem=f"missing: empty path in {where}")
    if os.path.isabs(raw):
        return Candidate(raw, None, problem=f"outside_source: resolves to {os.path.realpath(raw)} (absolute path)")
    norm = os.path.normpath(raw)
    full = source / norm
    real = os.path.realpath(full)
    if norm == ".." or norm.startswith("../") or not _inside(real, real_root):
        return Candidate(raw, None, problem=f"outside_source: resolves to {real}")
    path = Path(norm).as_posix()
    if not os.path.lexists(full):
        return Candidate(path, None, problem=f"missing: file listed in csv does not exist ({where})")
    if not label:
        return Candidate(path, None, problem=f"no_label: empty label in {where}")
    return Candidate(path, str(full), label, group, fold)


def _csv_duplicates(found: list[Candidate]) -> list[Candidate]:
    """A path listed twice: keep the first row if the labels agree, else reject every row."""
    rows: dict[str, list[int]] = {}
    for i, c in enumerate(found):
        if not c.problem:
            rows.setdefault(c.path, []).append(i)
    for path, where in rows.items():
        labels = sorted({found[i].label for i in where})
        if len(labels) > 1:
            problem = f"duplicate_conflict: listed in csv with labels {', '.join(labels)}"
            rejected = where
        else:
            problem, rejected = "duplicate: listed more than once in csv", where[1:]
        for i in rejected:
            found[i] = Candidate(path, None, problem=problem)
    return found


def _folder_label(c: Candidate) -> Candidate:
    if c.problem:
        return c
    head, sep, _ = c.path.partition("/")
    if not sep:
        return Candidate(c.path, None, problem="no_label: file is not inside a class folder")
    return Candidate(c.path, c.file, label=sys.intern(head))  # one string per class, not per file


def _pattern_label(c: Candidate, regex: re.Pattern[str]) -> Candidate:
    if c.problem:
        return c
    match = regex.fullmatch(c.path.rpartition("/")[2])
    if match is None or not match.group("label"):
        return Candidate(c.path, None, problem="no_label: file name does not match ingest.pattern")
    fields = match.groupdict()
    label, group, fold = (sys.intern(fields.get(key) or "") for key in ("label", "group", "fold"))
    return Candidate(c.path, c.file, label, group, fold)  # a string per distinct value, not per file


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _display(path: str) -> str:
    """A printable, UTF-8-encodable form of a path (undecodable bytes shown as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
