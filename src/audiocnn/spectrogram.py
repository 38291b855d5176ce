"""Stage spectrogram: normalized clips -> log-mel features (what the model reads), PNGs and a gallery.

Per clip (a pure function of the index record and the settings, run in parallel):
power STFT (centred), mel filterbank (built once per process), ``power_to_db`` with
ref 1.0 floored at clip max - top_db: float32 (frames, n_mels), written into its rows of one
packed file, ``features.npy`` (``audiocnn.packed``; rows laid out from normalize's sample counts).
The normalized clips are read from normalize's packed ``clips.npy``. Results are cached by the
normalized clip's content (``audiocnn.store``): a rerun after adding clips computes only the new
ones, and finds the others by the hash normalize recorded in its index (no clip is read for a hit)
in the previous outputs kept whole and in the journals of computed clips (``audiocnn.packcache``).
The previous output's file is linked whole into the new output as a shard when most of its rows
are still used (``features.npy``, then ``features.1.npy`` with only the clips it lacks: a run that
adds 1% of clips writes 1% of the rows); clips from elsewhere in the cache are copied by the
kernel. So the packed layout (which file and row holds a clip) depends on what the cache held;
each clip's features do not. PNGs are cached per clip (``audiocnn.store``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from audiocnn import fileio, images, melspec, normalize, packcache, packed, parallel, store
from audiocnn.audio import AudioParams
from audiocnn.config import ParamsError, check
from audiocnn.errors import DataError
from audiocnn.melspec import expected_frames, log_mel, mel_basis, mel_frequencies  # noqa: F401  (the stage's API)

log = logging.getLogger(__name__)

COPIED = "_rows_copied"  # a record whose rows came from the cache: (file, header bytes); only its image is computed


@dataclass(frozen=True)
class SpectrogramParams:
    """``spectrogram``: the log-mel front end, the per-clip images and the gallery."""

    n_fft: int  # samples per FFT window
    hop_length: int  # samples between frames
    n_mels: int  # mel bands
    fmin: float  # Hz, lowest mel band edge
    fmax: float  # Hz, highest mel band edge (<= audio.sample_rate / 2)
    top_db: float  # dB of dynamic range kept below each clip's maximum
    preemphasis: float  # a in the high-pass y[n] - a * y[n-1] (speech's pre-emphasis), as a gain per FFT bin; 0 = off
    workers: int  # processes; 0 = all cores
    images: bool  # also write one PNG per clip
    image_size: int  # pixels, square
    gallery_per_class: int  # clips per class in reports/gallery.png

    def __post_init__(self) -> None:
        check(self.n_fft >= 2, "n_fft", self.n_fft, "must be >= 2")
        check(0 < self.hop_length <= self.n_fft, "hop_length", self.hop_length, f"must be in 1..n_fft={self.n_fft}")
        check(self.n_mels > 0, "n_mels", self.n_mels, "must be > 0")
        check(self.n_mels <= self.n_fft // 2 + 1, "n_mels", self.n_mels, f"exceeds n_fft/2+1={self.n_fft // 2 + 1}")
        check(self.fmin >= 0, "fmin", self.fmin, "must be >= 0 Hz")
        check(self.fmax > self.fmin, "fmax", self.fmax, f"must be above fmin={self.fmin}")
        check(self.top_db > 0, "top_db", self.top_db, "must be > 0 dB")
        check(0 <= self.preemphasis < 1, "preemphasis", self.preemphasis, "must be in [0, 1) (0 = off)")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0 = all cores)")
        check(self.image_size > 0, "image_size", self.image_size, "must be > 0 pixels")
        check(self.gallery_per_class > 0, "gallery_per_class", self.gallery_per_class, "must be > 0")


def check_against_audio(params: SpectrogramParams, audio: AudioParams) -> None:
    """Cross-section check: the mel range must fit below the Nyquist frequency."""
    nyquist = audio.sample_rate / 2
    if params.fmax > nyquist:
        raise ParamsError(f"spectrogram.fmax={params.fmax:g} exceeds audio.sample_rate/2={nyquist:g} "
                          f"(audio.sample_rate={audio.sample_rate})")


def front_end_settings(sample_rate: int, params: SpectrogramParams) -> dict:
    """The params that decide a clip's log-mel features (features/meta.json, and the cache key's start)."""
    return {"sample_rate": sample_rate, "n_fft": params.n_fft, "hop_length": params.hop_length,
            "n_mels": params.n_mels, "fmin": params.fmin, "fmax": params.fmax, "top_db": params.top_db,
            "preemphasis": params.preemphasis}


def cache_settings(sample_rate: int, params: SpectrogramParams) -> dict:
    """Everything a cached feature depends on besides the clip: params, this code, library versions."""
    import PIL

    return {**front_end_settings(sample_rate, params),
            "code": store.source_digest(sys.modules[__name__], melspec, images, store), "numpy": np.__version__,
            "pillow": PIL.__version__}


def features_of(mono: np.ndarray, sample_rate: int, params: SpectrogramParams,
                image: bool = True) -> tuple[np.ndarray, bytes | None]:
    """(samples,) -> (db (frames, n_mels) float32, PNG bytes; None when images are off or not asked for)."""
    if mono.ndim != 1 or mono.size == 0:
        raise DataError(f"expected a non-empty (samples,) array, got shape {mono.shape}")
    db = log_mel(mono, sample_rate, params)
    if not (image and params.images):
        return db, None
    return db, images.png_bytes(images.render(db, params.top_db, params.image_size))


@dataclass(frozen=True)
class _Outputs:
    """Where ``run`` writes: the new shard of packed features (laid out by ``packed.create``) and the image folder."""

    array: str  # the new shard under the staged features folder ("": every clip's rows are in linked shards)
    header: int  # bytes before the first row
    images_dir: str
    slugs: Mapping[str, str]  # label -> image subfolder


def _clip_task(record: Mapping[str, str], normalized: packed.FolderStamp, out: _Outputs, sample_rate: int,
               params: SpectrogramParams, cache: store.ClipCache | None, journal: str | None) -> str:
    """One clip inside ``run``: its rows of the packed features and its image, computed; return the image.

    ``record`` carries the clip's ``offset`` (in its shard) and ``frames`` in the packed features,
    laid out from normalize's ``samples``: the column its clip is read by, so the two always
    agree. A record marked ``COPIED`` has its rows from the cache already (in the file it names)
    and only needs its image, rendered from them. Computed rows go to this process's journal in
    the folder ``journal`` (None: not cached). ``normalized``: normalize's output, stamped by ``run``.
    """
    frames = int(record["frames"])
    image = f"{out.slugs[record['label']]}/{record['id']}.png" if params.images else ""
    key = str(record.get(store.CLIP_HASH_COLUMN, "")).lower()
    if record.get(COPIED):
        rows_file, header = record[COPIED]
        db = packed.read_rows(rows_file, header, int(record["offset"]), frames, params.n_mels)
        png = images.png_bytes(images.render(db, params.top_db, params.image_size)) if image else None
    else:
        clips = packed.open_stamped(normalized)  # stamped once by run: no stat calls per clip
        mono = normalize.read_clip(clips, record["id"])  # (samples,) float32
        if cache is not None or key:
            key = _checked_key(record, mono, f"{clips.path} (clip {record['id']})")
        db, png = features_of(mono, sample_rate, params)
        with packed.RowWriter(out.array, out.header, params.n_mels) as writer:
            writer.write(int(record["offset"]), db)
        if journal is not None:
            packcache.journal_append(Path(journal), key, db)
    if image and png is not None:
        image_path = os.path.join(out.images_dir, image)
        store.write_bytes(image_path, png)
        if cache is not None and store.is_sha256(key):
            cache.put(key, f".{params.image_size}px.png", png, written=image_path)
    return image


def _checked_key(record: Mapping[str, str], mono: np.ndarray, where: str) -> str:
    """The clip's ``clip_sha256`` (its cache key); DataError when normalize's index recorded another one.

    A clip that changed after normalize wrote it (edited by hand, a partial copy) would
    otherwise give features that the index, and DVC, attribute to other content.
    """
    key = normalize.clip_sha256(mono)
    recorded = str(record.get(store.CLIP_HASH_COLUMN, "")).lower()
    if store.is_sha256(recorded) and recorded != key:
        raise DataError(f"{where}: content changed since normalize wrote it ({store.CLIP_HASH_COLUMN} "
                        f"{recorded[:12]}... in its index.csv, data {key[:12]}...): rerun normalize "
                        "(`dvc repro --force normalize`)")
    return key


def _from_packs(packs: packcache.PackCache, found: packcache.Found, placement: packcache.Placement,
                columns: Columns, keys: Sequence[str], results: list[str | None], cache: store.ClipCache,
                out: _Outputs, params: SpectrogramParams) -> None:
    """Clips the cache holds: rows in a linked shard or copied in bulk, images linked; ``results[i]``: the image.

    The key is normalize's hash of the clip (index column ``clip_sha256``, in lower case:
    ``keys``, as the cache was searched with), so no clip is read for a hit. ``columns`` hold each
    clip's offset in its own file. A clip whose image is not cached stays None, marked in a
    ``COPIED`` column (added here): a worker renders the image from its rows.
    """
    linked = ~placement.fresh
    count = len(results)
    copied = packs.copy_rows(placement.unlinked(found), out.array, out.header, columns["offset"],
                             columns["frames"]) if out.array else np.zeros(count, bool)
    marks: list[tuple[str, int] | None] = [None] * count
    for i in np.flatnonzero(copied | linked):
        image = ""
        if params.images:
            image = f"{out.slugs[columns['label'][i]]}/{columns['id'][i]}.png"
            if not cache.place_unread(keys[i], f".{params.image_size}px.png",
                                      os.path.join(out.images_dir, image), tail=images.PNG_END):
                shard = placement.shards[placement.shard[i]] if linked[i] else None
                marks[i] = (shard.path, shard.header) if shard else (out.array, out.header)
                continue
        results[i] = image
    columns[COPIED] = marks


Columns = dict[str, Any]  # an index as columns (name -> values), read and written without pandas (fileio)


def clip_layout(index: Columns, index_path: Path, params: SpectrogramParams) -> Columns:
    """``index`` with each clip's ``frames`` (int64 array) in the packed features, from normalize's ``samples``.

    normalize's own ``offset`` (the clip's place in its audio file) is dropped: ``run`` sets the
    clip's place in the features.
    """
    try:
        samples = np.array(index["samples"], dtype=np.int64)  # (clips,)
    except ValueError as err:
        raise DataError(f"{index_path}: column 'samples' is not integer ({err})") from None
    if (samples < 1).any():
        raise DataError(f"{index_path}: clip {index['id'][int(np.flatnonzero(samples < 1)[0])]} has no samples")
    layout = {name: values for name, values in index.items() if name != "offset"}
    layout["frames"] = np.array([expected_frames(int(n), params) for n in samples], dtype=np.int64)
    return layout


def run(normalized: Path, features: Path, images_dir: Path, gallery: Path, audio: AudioParams,
        params: SpectrogramParams, cache: store.ClipCache | None | str = "env") -> None:
    """Features for every clip in ``normalized/index.csv``: features.npy, index.csv, meta.json, PNGs, gallery.

    The features of all clips are packed (``audiocnn.packed``): clip ``id`` is rows ``offset`` to
    ``offset + frames`` of index.csv, over ``features.npy`` and the shards linked from the cache.
    ``cache``: a ClipCache, None (no cache) or "env" (``store.cache_root()``: $AUDIOCNN_CACHE_DIR).
    """
    index_path = normalized / packed.INDEX_NAME
    try:
        index = fileio.read_columns(index_path)
    except ValueError as err:
        raise DataError(str(err)) from None
    missing = sorted({"id", "label", "path", "samples"} - set(index))
    if missing:
        raise DataError(f"{index_path}: missing column(s) {', '.join(missing)}")
    if not index["id"]:
        raise DataError(f"{index_path}: no clips")
    layout = clip_layout(index, index_path, params)
    if cache == "env":
        cache = store.ClipCache.from_env("spectrogram", cache_settings(audio.sample_rate, params))
    with store.held(cache):  # its settings folder is not removed as an old one meanwhile
        slugs = {label: images.label_slug(label) for label in sorted(set(index["label"]))}
        parallel.one_blas_thread()  # before the first product, so that no second BLAS thread wakes to spin
        log_mel(np.zeros(params.n_fft, np.float32), audio.sample_rate, params)  # filterbank, before workers fork
        gallery_bytes: list[bytes] = []
        clips = packed.stamp(normalized, packed.AUDIO)
        packed.open_stamped(clips, index)  # checked once (and opened before the workers fork)
        draw_gallery = functools.partial(_gallery, index, normalized, audio, params, cache, gallery_bytes)
        # folders built under temporary names, renamed when complete (images first, then features with index.csv)
        with store.staged_dir(features) as features_tmp, store.staged_dir(images_dir) as images_tmp:
            if params.images:
                for slug in slugs.values():
                    (images_tmp / slug).mkdir()
            count = len(layout["id"])
            packs, found, placement = None, None, packcache.no_placement(count)
            keys = store.lowercase_keys(index.get(store.CLIP_HASH_COLUMN, []))
            if cache is not None and keys:
                packs = packcache.PackCache(cache, params.n_mels)
                packs.load()
                found = packs.find(keys, layout["frames"])
                placement = packs.place(found, packs.link(found, features_tmp, packed.FEATURES))
            fresh = np.flatnonzero(placement.fresh)  # clips whose rows go into the new file
            frames = layout["frames"]
            local = placement.local.copy()  # (clips,) first row in its own file
            local[fresh] = packed.offsets(frames[fresh])
            layout["offset"] = placement.offsets(local)
            array = features_tmp / packed.FEATURES.shard(len(placement.shards))
            header = packed.create(array, int(frames[fresh].sum()), params.n_mels) if fresh.size else 0
            out = _Outputs(str(array) if fresh.size else "", header, str(images_tmp), slugs)
            columns = {**layout, "offset": local}  # offsets in each clip's own file
            results: list[str | None] = [None] * count
            if packs is not None:
                _from_packs(packs, found, placement, columns, keys, results, cache, out, params)
            missed = [i for i, result in enumerate(results) if result is None]
            if len(missed) < count:
                log.info("feature cache: %d of %d clips cached (%d in %d linked file(s)), computing %d",
                         count - len(missed), count, count - fresh.size, len(placement.shards), len(missed))
            work = functools.partial(_clip_task, normalized=clips, out=out, sample_rate=audio.sample_rate,
                                     params=params, cache=cache, journal=str(packs.dir) if packs else None)
            try:
                computed = parallel.map_clips(work, fileio.Rows(columns, at=missed),  # a dict per clip as taken
                                              params.workers, "spectrogram",
                                              name=lambda record: f"{record['path']} (id {record['id']})",
                                              meanwhile=draw_gallery)
            finally:
                if packs is not None:
                    packcache.close_journal(packs.dir)  # (an in-process run's; the workers' close as they exit)
            for i, result in zip(missed, computed):
                results[i] = result
            if packs is not None:
                packs.keep(array if fresh.size else None, header, [keys[i] for i in fresh], local[fresh], frames[fresh],
                           reused=[shard.pack for shard in placement.shards])
            layout["image"] = results
            fileio.write_columns(features_tmp / packed.INDEX_NAME, layout)
            fileio.write_json(features_tmp / "meta.json", front_end_settings(audio.sample_rate, params))
    with fileio.atomic_path(gallery) as tmp:
        tmp.write_bytes(gallery_bytes[0])
    log.info("log-mel features of %d clips (%d frames, %d mels) in %s; images %s", len(layout["id"]),
             layout["frames"].sum(), params.n_mels, features / packed.FEATURES.array,
             images_dir if params.images else "off")


def _gallery(index: Columns, normalized: Path, audio: AudioParams, params: SpectrogramParams,
             cache: store.ClipCache | None, out: list[bytes]) -> None:
    """reports/gallery.png's bytes into ``out``: the first ``gallery_per_class`` ids (sorted) of every class.

    Runs while the workers compute (``map_clips(meanwhile=...)``), from the normalized clips;
    cached under a hash of its panels (labels, ids and the clips' ``clip_sha256``; the cache
    folder holds the settings), so an unchanged gallery costs no log-mel and no matplotlib.
    """
    taken: dict[str, int] = {}
    chosen = []  # (row, label, id) in id order, the first gallery_per_class of each label
    for row in sorted(range(len(index["id"])), key=index["id"].__getitem__):
        label = index["label"][row]
        if taken.get(label, 0) < params.gallery_per_class:
            taken[label] = taken.get(label, 0) + 1
            chosen.append((row, label, index["id"][row]))
    hashes = [index[store.CLIP_HASH_COLUMN][row].lower() for row, _, _ in chosen] \
        if store.CLIP_HASH_COLUMN in index else []
    by_hash = len(hashes) == len(chosen) and all(map(store.is_sha256, hashes))
    digest = hashlib.sha256(f"{params.gallery_per_class}{'/sha256' if by_hash else ''}".encode())
    clips = normalize.open_clips(normalized)

    def panel(label: str, clip_id: str) -> tuple[str, str, np.ndarray]:
        return label, clip_id, features_of(normalize.read_clip(clips, clip_id), audio.sample_rate, params,
                                           image=False)[0]

    panels = []
    for k, (_, label, clip_id) in enumerate(chosen):
        if by_hash:
            digest.update(f"\0{label}\0{clip_id}\0{hashes[k]}".encode())
            continue
        panels.append(panel(label, clip_id))
        digest.update(f"\0{label}\0{clip_id}\0".encode() + panels[-1][2].tobytes())
    key = digest.hexdigest()
    png = cache.get(key, ".gallery.png") if cache is not None else None
    if png is None or not images.is_complete_png(png):
        if by_hash:
            panels = [panel(label, clip_id) for _, label, clip_id in chosen]
        png = images.gallery_png(panels, params.gallery_per_class, audio.sample_rate, params.hop_length,
                                 params.fmin, params.fmax, params.top_db)
        if cache is not None:
            cache.put(key, ".gallery.png", png)
    out.append(png)
    log.info("gallery of %d clips (%d classes)", len(chosen), len(taken))
