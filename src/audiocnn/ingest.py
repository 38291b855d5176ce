"""Stage ingest: turn a folder of recordings into a checked manifest of clips.

Every candidate file (see ``audiocnn.layouts``) is decoded once, in blocks, and
hashed (``audiocnn.scanmemo`` remembers files already done, so a rerun after adding files
decodes only those); it is kept or rejected with a reason code (``unreadable``, ``empty``,
``non_finite``, ``silent``, ``too_short``, ``duplicate``, ``duplicate_conflict``,
``outside_source``, ``missing``, ``no_label``). Nothing is dropped silently, and the
stage fails when more than ``ingest.max_reject_fraction`` of the candidates is
rejected. Source files are only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm import tqdm

from audiocnn import audio, fileio, layouts
from audiocnn.scanmemo import ScanMemo
from audiocnn.config import check
from audiocnn.errors import DataError
from audiocnn.layouts import Candidate

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("id", "path", "label", "group", "fold", "duration", "sample_rate", "channels", "sha256")
REJECTED_COLUMNS = ("path", "reason")
SHOWN_REJECTS = 20  # rejections listed in logs and in the threshold error


@dataclass(frozen=True)
class IngestParams:
    """``ingest``: where the recordings are, how they are labelled, what is acceptable."""

    source: str  # folder with the audio (read-only)
    layout: Literal["folders", "csv", "pattern"]
    csv: str  # layout csv: metadata file relative to source
    pattern: str  # layout pattern: regex on file names with (?P<label>...)
    extensions: tuple[str, ...]  # audio file name endings, case-insensitive, without the dot
    min_duration: float  # seconds; shorter clips are rejected
    max_duration: float  # seconds; longer clips are kept, downstream uses this much
    max_reject_fraction: float  # fail when more than this fraction of candidates is rejected

    def __post_init__(self) -> None:
        check(self.source.strip() != "", "source", self.source, "must name the folder with the audio")
        check(self.layout != "csv" or self.csv.strip() != "", "csv", self.csv,
              "must name the metadata file (relative to ingest.source) when layout is csv")
        check(self.layout != "pattern" or self.pattern != "", "pattern", self.pattern,
              "must be a regex with (?P<label>...) when layout is pattern")
        if self.pattern:
            try:
                regex = re.compile(self.pattern)
            except re.error as err:
                regex = None
                check(False, "pattern", self.pattern, f"is not a valid regex: {err}")
            check(regex is not None and "label" in regex.groupindex, "pattern", self.pattern,
                  "needs a named group (?P<label>...)")
        extensions = tuple(e.strip().lstrip(".").lower() for e in self.extensions)
        check(len(extensions) > 0 and all(e and "/" not in e for e in extensions), "extensions", self.extensions,
              "must be a non-empty list of file name endings such as [wav, flac]")
        object.__setattr__(self, "extensions", extensions)
        check(self.min_duration >= 0, "min_duration", self.min_duration, "must be >= 0 seconds")
        check(self.max_duration > self.min_duration, "max_duration", self.max_duration,
              f"must be greater than ingest.min_duration={self.min_duration}")
        check(0 <= self.max_reject_fraction <= 1, "max_reject_fraction", self.max_reject_fraction,
              "must be within 0..1")


@dataclass(frozen=True)
class IngestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per kept clip, sorted by path
    rejected: pd.DataFrame  # REJECTED_COLUMNS, sorted by path
    metrics: dict[str, Any]  # clips, rejected, classes, clips_per_class, duration_s, rejected_by_reason


def ingest(source: Path, params: IngestParams) -> IngestResult:
    """Find, decode and check every candidate under ``source``; raise DataError above the reject threshold."""
    source = Path(source)
    if not source.is_dir():
        state = "is not a directory" if source.exists() else "does not exist"
        raise DataError(f"ingest.source {source} {state}")
    candidates = layouts.discover(source, params)
    if not candidates:
        what = f"rows in {source / params.csv}" if params.layout == "csv" else (
            f"files ending in {', '.join(params.extensions)}")
        raise DataError(f"ingest.source {source}: no candidates found (no {what})")
    clips: list[dict[str, Any]] = []
    rejected: list[tuple[str, str]] = []
    memo = ScanMemo.for_source(source)
    for candidate in tqdm(candidates, desc="ingest", unit="file", disable=None):
        outcome = check_clip(candidate, params.min_duration, memo)
        (clips if isinstance(outcome, dict) else rejected).append(outcome)
    if memo is not None:
        memo.save({c.file for c in candidates if c.file is not None})
        if memo.hits:
            log.info("ingest memo: %d of %d files unchanged since they were decoded (%s)", memo.hits,
                     len(candidates), memo.path)
    total = len(candidates)
    del candidates, memo  # a record per source file each: not needed past this point
    clips, duplicates = split_duplicates(clips)
    rejected = sorted(rejected + duplicates)
    _report(rejected, total, source, params)
    long_clips = sum(c["duration"] > params.max_duration for c in clips)
    if long_clips:
        log.info("%d clips are longer than ingest.max_duration=%g s: kept, downstream uses their first %g s",
                 long_clips, params.max_duration, params.max_duration)
    columns = {name: [c[name] for c in clips] for name in MANIFEST_COLUMNS if name != "id"}
    columns["id"] = [clip_id(path) for path in columns["path"]]
    del clips  # the columns hold the values: no dict per clip while the table is built
    manifest = pd.DataFrame(columns, columns=list(MANIFEST_COLUMNS))
    _check_unique_ids(manifest)
    return IngestResult(manifest, pd.DataFrame(rejected, columns=list(REJECTED_COLUMNS)), _metrics(manifest, rejected))


def check_clip(candidate: Candidate, min_duration: float,
               memo: ScanMemo | None = None) -> dict[str, Any] | tuple[str, str]:
    """Decode and hash one candidate: a manifest row (without id) or ``(path, 'code: detail')``.

    ``memo``: files unchanged since an earlier ingest are taken from it instead of decoded.
    """
    path = candidate.path
    if candidate.problem or candidate.file is None:
        return path, candidate.problem
    try:
        st = os.stat(candidate.file)
    except OSError as err:
        return path, f"unreadable: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        return path, "unreadable: not a regular file"
    known = memo.get(candidate.file, st) if memo is not None else None
    if known is not None:
        scan, digest = known
    else:
        try:
            scan = audio.scan(candidate.file)
        except audio.AudioReadError as err:
            return path, f"unreadable: {err.reason}"
        digest = ""
    outcome = _checked(candidate, scan, digest, min_duration)
    sha256 = outcome["sha256"] if isinstance(outcome, dict) else ""
    if memo is not None and (known is None or sha256 != digest):  # new, or hashed only now (it passes now)
        memo.put(candidate.file, st, scan, sha256)
    return outcome


def _checked(candidate: Candidate, scan: audio.AudioScan, digest: str,
             min_duration: float) -> dict[str, Any] | tuple[str, str]:
    """The verdict on a decoded candidate; hashes the file when it passes and ``digest`` is not known."""
    path = candidate.path
    if scan.frames == 0:
        return path, "empty: 0 samples"
    if scan.non_finite:
        return path, f"non_finite: {scan.non_finite} NaN/Inf samples"
    if scan.peak == 0:
        return path, "silent: all samples are zero"
    if scan.duration_s < min_duration:
        return path, f"too_short: {scan.duration_s:.4g} s < ingest.min_duration={min_duration:g}"
    if not digest:
        try:
            digest = sha256_file(candidate.file)  # type: ignore[arg-type]  (None only with a problem)
        except OSError as err:
            return path, f"unreadable: {err.strerror or err}"
    return {"path": path, "label": candidate.label, "group": candidate.group, "fold": candidate.fold,
            "duration": scan.duration_s, "sample_rate": scan.sample_rate, "channels": scan.channels,
            "sha256": digest}


def split_duplicates(clips: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Same bytes, same label: keep the first by path. Same bytes, two labels: reject every copy."""
    by_digest: dict[str, list[dict[str, Any]]] = {}
    for clip in sorted(clips, key=lambda c: c["path"]):
        by_digest.setdefault(clip["sha256"], []).append(clip)
    kept: list[dict[str, Any]] = []
    rejected: list[tuple[str, str]] = []
    for copies in by_digest.values():
        if len({c["label"] for c in copies}) > 1:
            for clip in copies:
                other = next(o for o in copies if o["label"] != clip["label"])
                rejected.append((clip["path"], f"duplicate_conflict: same content as {other['path']} "
                                               f"labelled {other['label']}"))
            continue
        kept.append(copies[0])
        rejected += [(c["path"], f"duplicate: same content as {copies[0]['path']}") for c in copies[1:]]
    return sorted(kept, key=lambda c: c["path"]), rejected


def sha256_file(path: str | Path) -> str:
    """sha256 of the file's bytes, read in chunks (read-only)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def clip_id(path: str) -> str:
    """``<slug of the file stem>-<first 8 hex of sha1(path)>``: unique and safe as a file name."""
    stem = Path(path).stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_stem.lower()).strip("-_")[:60].strip("-_") or "clip"
    return f"{slug}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}"


def write_outputs(result: IngestResult, manifest: Path, rejected: Path, metrics: Path) -> None:
    """Write manifest.csv, rejected.csv and the metrics JSON (each atomically)."""
    fileio.write_csv(manifest, result.manifest)
    fileio.write_csv(rejected, result.rejected)
    fileio.write_json(metrics, result.metrics)


def run(source: Path, params: IngestParams, manifest: Path, rejected: Path, metrics: Path) -> IngestResult:
    """The stage: ingest ``source`` and write the three outputs."""
    if Path(source) != Path(params.source):
        log.info("reading --source %s (params ingest.source is %s)", source, params.source)
    result = ingest(source, params)
    write_outputs(result, manifest, rejected, metrics)
    m = result.metrics
    log.info("ingest %s: kept %d clips (%d classes, %.1f s), rejected %d -> %s", source, m["clips"],
             m["classes"], m["duration_s"], m["rejected"], manifest)
    return result


def _report(rejected: list[tuple[str, str]], total: int, source: Path, params: IngestParams) -> None:
    """Log the rejections; raise DataError above the threshold or when nothing is left."""
    for path, reason in rejected[:SHOWN_REJECTS]:
        log.warning("rejected %s: %s", path, reason)
    if len(rejected) > SHOWN_REJECTS:
        log.warning("... and %d more rejections (see the rejected csv)", len(rejected) - SHOWN_REJECTS)
    fraction = len(rejected) / total
    if fraction <= params.max_reject_fraction and len(rejected) < total:
        return
    listing = "\n".join(f"  {path}: {reason}" for path, reason in rejected[:SHOWN_REJECTS])
    more = f"\n  ... and {len(rejected) - SHOWN_REJECTS} more" if len(rejected) > SHOWN_REJECTS else ""
    why = (f"{fraction:.1%} > ingest.max_reject_fraction={params.max_reject_fraction:g}"
           if fraction > params.max_reject_fraction else "no clip is left")
    raise DataError(f"ingest {source}: rejected {len(rejected)} of {total} files ({why}):\n{listing}{more}")


def _check_unique_ids(manifest: pd.DataFrame) -> None:
    clashes = manifest[manifest["id"].duplicated(keep=False)]
    if len(clashes):
        raise DataError(f"ingest: clip ids collide for {', '.join(clashes['path'])}; rename one of these files")


def _metrics(manifest: pd.DataFrame, rejected: list[tuple[str, str]]) -> dict[str, Any]:
    per_class = {str(k): int(v) for k, v in sorted(Counter(manifest["label"]).items())}
    reasons = Counter(reason.partition(":")[0] for _, reason in rejected)
    return {
        "clips": int(len(manifest)),
        "rejected": len(rejected),
        "classes": len(per_class),
        "clips_per_class": per_class,
        "duration_s": round(float(manifest["duration"].sum()), 3),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }
