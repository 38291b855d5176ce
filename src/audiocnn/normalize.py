"""Stage normalize: every manifest clip to mono float32 at audio.sample_rate, DC-free, level-normalized.

Per clip (a pure function of the manifest record and the settings, run in parallel):
read at most ``ingest.max_duration`` seconds, downmix to mono (mean of channels),
resample with soxr (HQ), subtract the mean, optionally trim quiet lead-in/tail, then
scale to ``target_dbfs`` by peak or RMS. Clips keep their full length. The clips are packed
one after another, ``clips.npy`` (``audiocnn.packed``; clip ``id`` is samples
``offset`` to ``offset + samples`` of index.csv), in manifest order whatever the number of
workers. Without trimming a clip's length follows from the manifest (duration x sample_rate,
resampled), so the file is laid out first and each worker writes its clips into their rows: no
sample passes through the main process. With trimming (or a manifest that mispredicts a length:
a warning) the clips are appended as they come back, pool workers handing their samples over in
spill files (``audiocnn.spill``). Results are cached by the source file's sha256
(``audiocnn.packcache``: the previous ``clips.npy`` kept whole, plus journals of computed clips):
a rerun after adding clips reads and normalizes only the new ones. The previous output's file is
linked whole into the new output while it still serves most of its clips, and only the others
go into a new file (``clips.1.npy``, ...; read as one array by ``audiocnn.packed``); clips from
elsewhere in the cache are copied inside the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import soxr

from audiocnn import fileio, packcache, packed, parallel, spill, store
from audiocnn.audio import AudioParams, read_audio
from audiocnn.config import ParamsError, check
from audiocnn.errors import DataError

log = logging.getLogger(__name__)

SILENT_DBFS = -120.0  # a clip whose peak is below this is silent: left unscaled
RMS_PEAK_CEILING_DBFS = -0.1  # rms method: the peak may not exceed this after scaling
TRIM_HOP_SECONDS = 0.01  # silence trim works on 10 ms blocks
CACHED_FIELDS = np.dtype([("clip", "S32"), ("silent", "?")])  # cached per clip: clip_sha256 (raw), is_silent
JOURNAL_ENTRY = packcache.entry_dtype(CACHED_FIELDS)
SPILL_DIR = ".spill"  # under the staged output: the pool workers' computed samples until copied into clips.npy
PLANNED_OFFSET, PLANNED_ROWS = "_planned_offset", "_planned_rows"  # a computed clip's place in the planned layout


@dataclass(frozen=True)
class NormalizeParams:
    """``normalize``: loudness normalization and silence trimming."""

    method: Literal["peak", "rms"]
    target_dbfs: float  # level after normalization (peak or RMS), dB full scale
    trim_db: float  # >0: trim leading/trailing audio quieter than peak - trim_db; 0: off
    workers: int  # processes; 0 = all cores (speed only: the output does not depend on it)

    def __post_init__(self) -> None:
        check(math.isfinite(self.target_dbfs) and self.target_dbfs <= 0, "target_dbfs", self.target_dbfs,
              "must be a finite level <= 0 dBFS")
        check(math.isfinite(self.trim_db) and self.trim_db >= 0, "trim_db", self.trim_db, "must be >= 0 (0 = off)")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0 = all cores)")


def max_duration_from(params: Mapping[str, Any]) -> float:
    """``ingest.max_duration`` (seconds) from the raw params dict, validated."""
    ingest = params.get("ingest")
    value = ingest.get("max_duration") if isinstance(ingest, Mapping) else None
    if value is None:
        raise ParamsError("ingest.max_duration is missing (normalize reads at most this many seconds per clip)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ParamsError(f"ingest.max_duration={value!r} must be a positive number of seconds")
    return float(value)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(frames, channels) or (frames,) -> (frames,) float32, the mean of the channels."""
    if audio.ndim == 1:
        return audio.astype(np.float32, copy=False)
    if audio.shape[1] == 1:
        return np.ascontiguousarray(audio[:, 0], dtype=np.float32)
    return audio.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(mono: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """(samples,) at rate_in -> (about samples*rate_out/rate_in,) at rate_out, soxr high quality."""
    if rate_in == rate_out or mono.size == 0:
        return mono
    return soxr.resample(mono, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def remove_dc(mono: np.ndarray) -> np.ndarray:
    """Subtract the mean (float64 accumulation)."""
    if mono.size == 0:
        return mono
    return (mono - np.float32(mono.mean(dtype=np.float64))).astype(np.float32, copy=False)


def trim_silence(mono: np.ndarray, trim_db: float, hop_samples: int) -> np.ndarray:
    """Cut leading/trailing ``hop_samples`` blocks whose peak is below the clip peak - trim_db.

    The block holding the clip's peak always stays, so a clip is never trimmed to
    nothing; silent clips, clips shorter than one block and ``trim_db=0`` are untouched.
    """
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if trim_db <= 0 or mono.size <= hop_samples or peak <= 10 ** (SILENT_DBFS / 20):
        return mono
    blocks = math.ceil(mono.size / hop_samples)
    padded = np.zeros(blocks * hop_samples, dtype=np.float32)
    padded[: mono.size] = np.abs(mono)
    block_peak = padded.reshape(blocks, hop_samples).max(axis=1)  # (blocks,)
    loud = np.flatnonzero(block_peak >= peak * 10 ** (-trim_db / 20))
    return mono[loud[0] * hop_samples : min(mono.size, (loud[-1] + 1) * hop_samples)]


def normalize_level(mono: np.ndarray, method: str, target_dbfs: float) -> np.ndarray:
    """Scale so the peak (method peak) or RMS (method rms) sits at ``target_dbfs``.

    With rms, a gain that would push the peak above 0 dBFS is lowered so the peak
    sits at -0.1 dBFS. Silent clips (peak below -120 dBFS) are returned unscaled.
    """
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if peak <= 10 ** (SILENT_DBFS / 20):
        return mono
    target = 10 ** (target_dbfs / 20)
    if method == "peak":
        gain = target / peak
    else:
        gain = target / math.sqrt(float(np.mean(np.square(mono, dtype=np.float64))))
        if peak * gain > 1.0:
            log.debug("rms gain %.1f dB would clip (peak %+.1f dBFS): limited to peak %.1f dBFS",
                      20 * math.log10(gain), 20 * math.log10(peak * gain), RMS_PEAK_CEILING_DBFS)
            gain = 10 ** (RMS_PEAK_CEILING_DBFS / 20) / peak
    return (mono * np.float32(gain)).astype(np.float32, copy=False)


def normalize_signal(audio: np.ndarray, rate_in: int, sample_rate: int, params: NormalizeParams) -> np.ndarray:
    """(frames, channels) at rate_in -> (samples,) float32 mono at sample_rate, normalized."""
    mono = remove_dc(resample(to_mono(audio), rate_in, sample_rate))
    mono = trim_silence(mono, params.trim_db, max(1, round(sample_rate * TRIM_HOP_SECONDS)))
    return normalize_level(mono, params.method, params.target_dbfs)


def normalized_audio(record: Mapping[str, str], source: Path, sample_rate: int, params: NormalizeParams,
                     max_seconds: float) -> np.ndarray:
    """Read and normalize one manifest record: (samples,) float32 mono at ``sample_rate``."""
    audio, rate_in = read_audio(source / record["path"], max_seconds)  # (frames, channels) float32
    if not np.isfinite(audio).all():
        raise DataError(f"{record['path']}: {np.count_nonzero(~np.isfinite(audio))} NaN/Inf sample(s)")
    mono = normalize_signal(audio, rate_in, sample_rate, params)  # (samples,) float32
    if mono.size == 0:
        raise DataError(f"{record['path']}: no samples to normalize")
    return mono


def is_silent(mono: np.ndarray) -> bool:
    return bool(np.max(np.abs(mono)) <= 10 ** (SILENT_DBFS / 20))


def open_clips(normalized: str | Path) -> packed.Packed:
    """The packed clips of normalize's output folder (``clips.npy`` and ``index.csv``), opened once per process."""
    return packed.open_folder(normalized, packed.AUDIO)


def read_clip(clips: packed.Packed, clip_id: str) -> np.ndarray:
    """One normalized clip: (samples,) float32 (read-only)."""
    return clips.clip(clip_id)[:, 0]


def clip_sha256(mono: np.ndarray) -> str:
    """The clip's content hash (index column ``clip_sha256``): sha256 of its float32 little-endian samples."""
    return hashlib.sha256(np.ascontiguousarray(mono, dtype=packed.DTYPE)).hexdigest()


def cache_settings(sample_rate: int, params: NormalizeParams, max_seconds: float) -> dict:
    """Everything a cached clip depends on besides the source file's bytes: params, code, library versions."""
    import soundfile

    from audiocnn import audio

    return {"sample_rate": sample_rate, "method": params.method, "target_dbfs": params.target_dbfs,
            "trim_db": params.trim_db, "max_seconds": max_seconds,
            "code": store.source_digest(sys.modules[__name__], audio, store), "numpy": np.__version__,
            "soxr": soxr.__version__, "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__}


@dataclass(frozen=True)
class _Work:
    """What computing one clip inside ``run`` needs besides its manifest record (picklable, for the pool)."""

    source: Path
    sample_rate: int
    params: NormalizeParams
    max_seconds: float
    journal: str | None  # the cache's packs folder (computed clips go to this process's journal there); None: off


def _computed(record: Mapping[str, Any], work: _Work) -> tuple[np.ndarray, bool, str]:
    """One clip normalized: ((samples, 1) float32, silent, ``clip_sha256``), journalled when the cache is on.

    The spectrogram stage keys its cache by the hash, so finding a clip's cached features
    needs no read of the clip.
    """
    mono = normalized_audio(record, work.source, work.sample_rate, work.params, work.max_seconds)[:, np.newaxis]
    silent, digest = is_silent(mono), clip_sha256(mono)
    if work.journal is not None:
        packcache.journal_append(Path(work.journal), str(record.get("sha256", "")).lower(), mono, JOURNAL_ENTRY,
                                 (bytes.fromhex(digest), silent))
    return mono, silent, digest


def _planned_task(record: Mapping[str, Any], work: _Work, array: str, header: int) -> tuple[int, bool, str]:
    """One clip into its planned rows of ``array`` (``record[PLANNED_ROWS]`` from ``record[PLANNED_OFFSET]``).

    Written only when its length is the planned one; returns (its length, silent, digest).
    """
    mono, silent, digest = _computed(record, work)
    if mono.shape[0] == record[PLANNED_ROWS]:
        with packed.RowWriter(array, header, 1) as writer:
            writer.write(int(record[PLANNED_OFFSET]), mono)
    return mono.shape[0], silent, digest


def _appended_task(record: Mapping[str, Any], work: _Work,
                   spill_dir: str | None) -> tuple[np.ndarray | spill.Spilled, bool, str]:
    """One clip for appending: (its samples, silent, digest).

    The samples are the (samples, 1) array, or where a pool worker wrote them into its spill
    file in ``spill_dir`` (``audiocnn.spill``: not piped back, so memory does not grow with the
    clips' length).
    """
    mono, silent, digest = _computed(record, work)
    return (mono if spill_dir is None else spill.spill(spill_dir, mono)), silent, digest


def planned_lengths(index: Mapping[str, Sequence[str]], sample_rate: int, params: NormalizeParams,
                    max_seconds: float) -> np.ndarray | None:
    """Each clip's output samples predicted from the manifest's duration and sample_rate: (clips,) int64.

    As ``normalized_audio`` makes them: the frames read (at most ``ceil(max_seconds * rate)``),
    resampled by soxr to ``floor(frames * sample_rate / rate + 0.5)`` samples (measured: soxr HQ
    returns exactly that). None when they cannot be predicted: silence trimming on, or a
    manifest without usable columns. ``index``: the manifest's columns (a DataFrame or ``fileio.read_columns``).
    """
    if params.trim_db > 0 or not {"duration", "sample_rate"} <= set(index):
        return None
    duration, rate = _numbers(index["duration"]), _numbers(index["sample_rate"])  # (clips,) float64, NaN: not a number
    with np.errstate(invalid="ignore"):
        frames = np.round(duration * rate)
        if math.isfinite(max_seconds):
            frames = np.minimum(frames, np.ceil(max_seconds * rate))
    if not (np.isfinite(frames).all() and (frames >= 1).all() and (rate >= 1).all() and (rate == np.round(rate)).all()):
        return None
    frames, rate = frames.astype(np.int64), rate.astype(np.int64)
    resampled = (2 * frames * sample_rate + rate) // (2 * rate)  # floor(frames * sample_rate / rate + 0.5), exact
    return np.where(rate == sample_rate, frames, resampled)


def _numbers(values: Sequence[str]) -> np.ndarray:
    """(n,) float64 of text ``values``; NaN where one is not a number."""
    numbers = np.full(len(values), np.nan)
    for k, value in enumerate(values):
        with contextlib.suppress(TypeError, ValueError):
            numbers[k] = float(value)
    return numbers


def _source_keys(index: Mapping[str, Sequence[str]]) -> list[str]:
    """Each clip's cache key: the manifest's sha256 of its source file ("" where the manifest has none)."""
    if "sha256" not in index:
        return [""] * len(index["id"])
    return store.lowercase_keys(index["sha256"])


def _duplicates(ids: Sequence[str]) -> list[str]:
    """The ids that occur again after their first row, in order."""
    seen: set[str] = set()
    return [clip_id for clip_id in ids if clip_id in seen or seen.add(clip_id)]


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, end, flag) of each run of equal values in the (n,) bool ``flags``."""
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flags.size]])
    return [(int(a), int(b), bool(flags[a])) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class _Written:
    """What ``run`` wrote: each clip's first sample (in its own file), samples, content hash, silence."""

    header: int  # bytes before the new file's first sample
    offsets: np.ndarray  # (clips,) int64, in the clip's file: a linked one (``packcache.Placement``) or the new one
    samples: np.ndarray  # (clips,) int64
    digests: list[str]  # (clips,) hex clip_sha256
    silent: np.ndarray  # (clips,) bool


def _from_cache(found: packcache.Found, rows: np.ndarray, written: _Written) -> None:
    """Record the cached clips ``rows`` (indices) as ``written``: length, hash and silence from their entries."""
    written.samples[rows] = found.length[rows]
    written.silent[rows] = found.entry["silent"][rows]
    for i, digest in zip(rows, packcache.hex_digests(found.entry["clip"][rows])):
        written.digests[i] = digest


@contextlib.contextmanager
def _computing(compute: Callable[[dict], tuple], records: Sequence[dict], work: _Work,
               chunk: int = parallel.STREAM_CHUNK) -> Iterator[Iterator[tuple]]:
    """``compute`` over ``records``, results in order (``parallel.iter_clips``, ``chunk`` clips per task at most).

    On leaving, the pool's workers have exited (their journals released) and this process's
    journal is closed, whether the caller read every result or stopped early.
    """
    computed = parallel.iter_clips(compute, records, work.params.workers, "normalize", chunk=chunk)
    try:
        yield computed
    finally:
        computed.close()
        if work.journal is not None:
            packcache.close_journal(Path(work.journal))


def _write_planned(array: Path, records: fileio.Rows, lengths: np.ndarray, packs: packcache.PackCache | None,
                   found: packcache.Found | None, placement: packcache.Placement, work: _Work) -> _Written | None:
    """The clips not in a linked file at rows of ``array`` laid out in advance (``lengths``; a cached clip's own).

    Cached ones are copied, others computed; no sample passes through this process. None when a
    computed clip's length differs from its planned one (the caller then appends); the clips
    computed so far are in the journals.
    """
    count = len(records)
    lengths = np.asarray(lengths, np.int64).copy()
    if found is not None:
        lengths[found.pack >= 0] = found.length[found.pack >= 0]  # a cached clip's length is known exactly
    fresh = placement.fresh  # (clips,) rows in the new file
    offsets = placement.local.copy()
    offsets[fresh] = packed.offsets(lengths[fresh])
    header = packed.create(array, int(lengths[fresh].sum()), 1) if fresh.any() else 0
    written = _Written(header, offsets, lengths, [""] * count, np.zeros(count, dtype=bool))
    done = ~fresh
    if found is not None:
        _from_cache(found, np.flatnonzero(done), written)
        if fresh.any():
            copied = packs.copy_rows(placement.unlinked(found), str(array), header, offsets, lengths)  # type: ignore
            _from_cache(found, np.flatnonzero(copied), written)
            done |= copied
    todo = np.flatnonzero(~done)
    if done.any():
        log.info("feature cache: %d of %d clips normalized already (%d in %d linked file(s)), computing %d",
                 done.sum(), count, (~fresh).sum(), len(placement.shards), todo.size)
    tasks = fileio.Rows({**records.columns, PLANNED_OFFSET: written.offsets, PLANNED_ROWS: written.samples}, at=todo)
    compute = functools.partial(_planned_task, work=work, array=str(array), header=written.header)
    with _computing(compute, tasks, work, parallel.MAP_CHUNK) as computed:  # small results: rows go to the file
        for i, (samples, written.silent[i], written.digests[i]) in zip(todo, computed):
            if samples != written.samples[i]:
                log.warning("%s: %d samples, not the %d its manifest's duration and sample_rate predict: "
                            "appending the clips instead", records.columns["path"][i], samples, written.samples[i])
                return None
    return written


def _write_appended(array: Path, records: fileio.Rows, packs: packcache.PackCache | None,
                    found: packcache.Found | None, placement: packcache.Placement, work: _Work,
                    spill_dir: Path) -> _Written:
    """The clips not in a linked file appended to ``array`` in manifest order: cached ones copied, others computed.

    Pool workers hand their samples over in spill files under ``spill_dir`` (removed at the end).
    """
    count = len(records)
    written = _Written(packed.HEADER_BYTES, placement.local.copy(), np.zeros(count, np.int64), [""] * count,
                       np.zeros(count, dtype=bool))
    fresh = np.flatnonzero(placement.fresh)  # the clips appended, in order
    hit = found.pack[fresh] >= 0 if found is not None else np.zeros(fresh.size, dtype=bool)  # (fresh,)
    if found is not None:
        _from_cache(found, np.flatnonzero(~placement.fresh), written)
    if fresh.size < count or hit.any():
        log.info("feature cache: %d of %d clips normalized already (%d in %d linked file(s)), computing %d",
                 count - fresh.size + hit.sum(), count, count - fresh.size, len(placement.shards), (~hit).sum())
    if not fresh.size:
        return written
    computing = fileio.Rows(records.columns, at=fresh[~hit])
    compute_here = functools.partial(_appended_task, work=work, spill_dir=None)
    compute = compute_here
    if parallel.in_pool(work.params.workers, len(computing)):
        spill_dir.mkdir()
        compute = functools.partial(_appended_task, work=work, spill_dir=str(spill_dir))
    with _computing(compute, computing, work) as computed, packed.Appender(array, width=1) as clips:
        for start, end, cached in _runs(hit):
            done = start
            if cached:  # copied in bulk from the packs; from a pack that fails on, computed here
                copied = packs.append_rows(found, fresh[start:end], clips)  # type: ignore[union-attr]
                done = start + len(copied)
                written.offsets[fresh[start:done]] = copied
                _from_cache(found, fresh[start:done], written)  # type: ignore[arg-type]
            for i in fresh[done:end]:
                result, written.silent[i], written.digests[i] = \
                    compute_here(records[i]) if cached else next(computed)
                if isinstance(result, spill.Spilled):
                    written.offsets[i], written.samples[i] = clips.append_spilled(result), result.rows
                else:
                    written.offsets[i], written.samples[i] = clips.append(result), result.shape[0]
    if spill_dir.exists():
        shutil.rmtree(spill_dir)
    return written


def run(source: Path, manifest: Path, out: Path, audio: AudioParams, params: NormalizeParams,
        max_seconds: float, cache: store.ClipCache | None | str = "env") -> None:
    """Normalize every clip in ``manifest``; write ``out/clips.npy`` and ``out/index.csv`` (see the module doc).

    ``cache``: a ClipCache, None (no cache) or "env" (``store.cache_root()``: $AUDIOCNN_CACHE_DIR).
    """
    try:
        index = fileio.read_columns(manifest)  # (pandas' import alone would be ~0.5 s of a run adding a few clips)
    except ValueError as err:
        raise DataError(str(err)) from None
    missing = sorted({"id", "path"} - set(index))
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}")
    if not index["id"]:
        raise DataError(f"{manifest}: no clips to normalize")
    duplicated = _duplicates(index["id"])
    if duplicated:
        raise DataError(f"{manifest}: duplicate id(s) {', '.join(duplicated[:5])}")
    if cache == "env":
        cache = store.ClipCache.from_env("normalize", cache_settings(audio.sample_rate, params, max_seconds))
    with store.held(cache):  # its settings folder is not removed as an old one meanwhile
        keys = _source_keys(index)
        packs = None
        if cache is not None:
            packs = packcache.PackCache(cache, width=1, extra=CACHED_FIELDS)
            packs.load()
        work = _Work(Path(source), audio.sample_rate, params, max_seconds, str(packs.dir) if packs else None)
        records = fileio.Rows(index)  # a dict per clip when a worker takes it, not held for all
        lengths = planned_lengths(index, audio.sample_rate, params, max_seconds)
        with store.staged_dir(out) as tmp:  # renamed to ``out`` once clips.npy and index.csv are written
            found, placement = None, packcache.no_placement(len(records))
            if packs is not None:  # the previous output's files that still serve: linked in whole
                found = packs.find(keys)
                placement = packs.place(found, packs.link(found, tmp, packed.AUDIO))
            array = tmp / packed.AUDIO.shard(len(placement.shards))  # the new file: the other clips
            clips = None
            if lengths is not None:
                clips = _write_planned(array, records, lengths, packs, found, placement, work)
            if clips is None:  # lengths unknown in advance (or mispredicted): appended as computed
                if packs is not None:
                    packs.load()  # (with the journals of clips the planned attempt computed)
                    found = packs.find(keys)
                    placement = packs.place(found, placement.shards)
                clips = _write_appended(array, records, packs, found, placement, work, tmp / SPILL_DIR)
            index["offset"] = placement.offsets(clips.offsets)
            index["samples"] = clips.samples
            index[store.CLIP_HASH_COLUMN] = clips.digests
            fileio.write_columns(tmp / packed.INDEX_NAME, index)
            if packs is not None:
                fresh = np.flatnonzero(placement.fresh)
                extra = np.zeros(fresh.size, CACHED_FIELDS)
                extra["clip"] = [bytes.fromhex(clips.digests[i]) for i in fresh]
                extra["silent"] = clips.silent[fresh]
                packs.keep(array if fresh.size else None, clips.header, [keys[i] for i in fresh], clips.offsets[fresh],
                           clips.samples[fresh], extra, reused=[shard.pack for shard in placement.shards])
    silent_paths = [index["path"][i] for i in np.flatnonzero(clips.silent)]
    if silent_paths:
        log.warning("%d silent clip(s) (peak below %.0f dBFS) left unscaled, e.g. %s",
                    len(silent_paths), SILENT_DBFS, silent_paths[0])
    log.info("normalized %d clips to %d Hz, %s %.1f dBFS: %.1f s of audio in %s", len(index["id"]), audio.sample_rate,
             params.method, params.target_dbfs, clips.samples.sum() / audio.sample_rate, out / packed.AUDIO.array)

