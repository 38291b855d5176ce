"""store: staged output folders (kill -9 safe), .npy bytes, and the feature cache used by normalize/spectrogram."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audiocnn import config, data, fileio, normalize, packed, spectrogram, store
from audiocnn.audio import AudioParams
from audiocnn.errors import DataError
from audiocnn.normalize import NormalizeParams
from audiocnn.spectrogram import SpectrogramParams

REPO = Path(__file__).resolve().parents[1]
RATE = 16000


def section(name: str, cls, **overrides):
    values = {**config.read_params(REPO / "params.yaml")[name], "workers": 1, **overrides}
    return config.load_section({name: values}, name, cls)


# --- staged output folders --------------------------------------------------------------------------------------


def test_staged_dir_replaces_the_output_only_when_complete(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with store.staged_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and not out.exists()
        store.write_bytes(str(tmp / "a.npy"), b"data")
    assert sorted(p.name for p in out.iterdir()) == ["a.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError), store.staged_dir(out) as tmp:
        store.write_bytes(str(tmp / "b.npy"), b"half")
        raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_staged_dir_after_kill_9_leaves_no_output_and_is_cleaned(tmp_path):
    code = (f"import os, signal\nfrom audiocnn import store\n"
            f"with store.staged_dir({str(tmp_path / 'out')!r}) as tmp:\n"
            f"    store.write_bytes(str(tmp / 'a.npy'), b'x' * 100)\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = list(tmp_path.glob(".out.*.tmp"))
    assert len(leftovers) == 1  # the half-built folder, never under the output's name
    with store.staged_dir(tmp_path / "out"):
        assert not leftovers[0].exists()  # removed by the next run


def test_npy_bytes_are_what_np_save_writes(tmp_path):
    db = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", db)
    assert store.npy_bytes(db) == (tmp_path / "x.npy").read_bytes()


def test_place_unread_checks_size_and_ending_without_reading_the_whole_entry(tmp_path):
    cache = store.ClipCache(tmp_path / "c", "stage", {})
    cache.prepare()
    key = hashlib.sha256(b"clip").hexdigest()
    assert not cache.place_unread(key, ".bin", str(tmp_path / "none"))  # a miss
    cache.put(key, ".bin", b"payload-END")
    assert cache.place_unread(key, ".bin", str(tmp_path / "a"), size=11, tail=b"END")
    assert os.path.samefile(tmp_path / "a", cache.path(key, ".bin"))
    assert not cache.place_unread(key, ".bin", str(tmp_path / "b"), tail=b"XYZ")  # damaged: discarded
    assert not (tmp_path / "b").exists() and cache.get(key, ".bin") is None
    assert (tmp_path / "a").read_bytes() == b"payload-END"  # the output linked before stays whole
    cache.put(key, ".bin", b"payload-END")
    assert not cache.place_unread(key, ".bin", str(tmp_path / "c"), size=12)
    assert cache.get(key, ".bin") is None


def test_lowercase_keys_keep_a_lower_case_hash_as_is():
    lower, upper = "ab" * 32, "AB" * 32
    keys = store.lowercase_keys([lower, upper, "", 7])
    assert keys == [lower, lower, "", "7"] and keys[0] is lower  # the same object: no copy per clip


def test_cache_root_from_environment(tmp_path):
    assert store.cache_root({}) == Path(".cache/audiocnn")
    assert store.cache_root({"AUDIOCNN_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert store.cache_root({"AUDIOCNN_CACHE_DIR": "off"}) is None


def test_cache_put_get_link_and_settings_hash(tmp_path):
    cache = store.ClipCache(tmp_path / "c", "stage", {"a": 1})
    cache.prepare()
    assert (tmp_path / "c" / ".gitignore").read_text().splitlines()[-1] == "*"
    key = hashlib.sha256(b"clip").hexdigest()
    assert cache.get(key, ".npy") is None
    out = tmp_path / "out.npy"
    store.write_bytes(str(out), b"result")
    cache.put(key, ".npy", b"result", written=str(out))
    assert cache.get(key, ".npy") == b"result"
    assert os.path.samefile(cache.path(key, ".npy"), out)  # a hard link, not a second copy
    assert store.ClipCache(tmp_path / "c", "stage", {"a": 2}).dir != cache.dir
    assert store.ClipCache(tmp_path / "c", "stage", {"a": 1}).dir == cache.dir


def used_caches(root: Path, n: int, first: int = 0) -> list[store.ClipCache]:
    """Settings folders ``first`` .. ``first + n - 1`` of one stage, each used (prepared, closed) in turn, 1 s apart."""
    caches = []
    for i in range(first, first + n):
        with store.ClipCache(root, "stage", {"a": i}) as cache:
            cache.put(hashlib.sha256(b"clip").hexdigest(), ".bin", b"x")
        past = time.time_ns() - (1000 - i) * 10**9  # distinct last uses, whatever the file system's mtime resolution
        os.utime(cache.dir / store.IN_USE, ns=(past, past))
        caches.append(cache)
    return caches


def settings_left(root: Path) -> set[str]:
    return {folder.name for folder in (root / "stage").iterdir()}


def test_only_the_most_recently_used_settings_folders_are_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="audiocnn.store")
    caches = used_caches(tmp_path, store.KEEP_SETTINGS + 2)
    assert settings_left(tmp_path) == {c.settings_hash for c in caches[-store.KEEP_SETTINGS:]}
    assert "removed" in caplog.text and str(caches[0].dir) in caplog.text
    with caches[-store.KEEP_SETTINGS]:  # the oldest kept one used again: now the newest, nothing removed
        pass
    assert settings_left(tmp_path) == {c.settings_hash for c in caches[-store.KEEP_SETTINGS:]}
    newer = used_caches(tmp_path, 1, first=100)
    assert settings_left(tmp_path) == {c.settings_hash for c in caches[-store.KEEP_SETTINGS:][:1] + caches[-2:] + newer}


def test_a_settings_folder_in_use_is_never_removed(tmp_path):
    held = store.ClipCache(tmp_path, "stage", {"held": True})
    held.prepare()
    past = time.time_ns() - 10**12
    os.utime(held.dir / store.IN_USE, ns=(past, past))  # the oldest folder of all
    caches = used_caches(tmp_path, store.KEEP_SETTINGS + 1)
    assert held.settings_hash in settings_left(tmp_path)  # in use by a run: kept beyond the bound
    assert caches[0].settings_hash not in settings_left(tmp_path)
    assert pickle.loads(pickle.dumps(held))._lock is None  # a spawned worker gets no lock of its own
    held.close()
    used_caches(tmp_path, 1, first=100)
    assert held.settings_hash not in settings_left(tmp_path)  # released: removed as the oldest


def test_a_folder_removed_while_waiting_for_it_is_made_again(tmp_path):
    """A run that gets its folder's lock only after a removal moved the folder away holds a new folder."""
    cache = store.ClipCache(tmp_path, "stage", {})
    cache.dir.mkdir(parents=True)
    remover = open(cache.dir / store.IN_USE, "ab")
    fcntl.flock(remover, fcntl.LOCK_EX)  # a removal in progress
    outcome = []

    def prepare() -> None:
        try:
            cache.prepare()
            outcome.append("held")
        except Exception as err:  # noqa: BLE001 (reported by the assert below)
            outcome.append(err)

    waiting = threading.Thread(target=prepare)
    waiting.start()
    time.sleep(0.2)
    os.rename(cache.dir, tmp_path / "stage" / f".{cache.settings_hash}.removing")
    cache.dir.mkdir()
    (cache.dir / store.IN_USE).touch()  # made again meanwhile by another run
    remover.close()
    waiting.join(10)
    assert not waiting.is_alive() and outcome == ["held"]
    lock = cache.dir / store.IN_USE
    assert os.fstat(cache._lock.fileno()).st_ino == lock.stat().st_ino  # the new folder's lock file
    assert (cache.dir / "ff").is_dir()
    cache.close()


def test_stages_release_their_settings_folder(tmp_path):
    make_manifest(tmp_path)
    run_both(tmp_path, "out", tmp_path / "cache")
    for stage in ("normalize", "spectrogram"):
        (folder,) = (tmp_path / "cache" / stage).iterdir()
        with open(folder / store.IN_USE, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a run still held it


# --- the cache in the stages ----------------------------------------------------------------------------------------


def make_manifest(tmp_path: Path, clips: int = 4) -> tuple[Path, Path]:
    """``clips`` WAVs (2 labels) and a manifest with their real sha256."""
    source = tmp_path / "source"
    source.mkdir()
    rows = []
    for k in range(clips):
        t = np.arange(int(RATE * (0.3 + 0.1 * k))) / RATE
        path = source / f"c{k}.wav"
        sf.write(path, (0.2 * np.sin(2 * np.pi * (200 + 150 * k) * t)).astype(np.float32), RATE)
        rows.append({"id": f"c{k}", "path": path.name, "label": "ab"[k % 2], "group": "", "fold": "",
                     "duration": str(t.size / RATE), "sample_rate": str(RATE), "channels": "1",
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = tmp_path / "manifest.csv"
    fileio.write_csv(manifest, pd.DataFrame(rows))
    return source, manifest


def run_both(tmp_path: Path, name: str, cache, norm=None, spec=None) -> Path:
    """normalize + spectrogram into tmp_path/name with ``cache`` (a root folder or None)."""
    source, manifest = tmp_path / "source", tmp_path / "manifest.csv"
    norm = norm or section("normalize", NormalizeParams)
    spec = spec or section("spectrogram", SpectrogramParams, images=True, image_size=32, gallery_per_class=1)
    out, audio = tmp_path / name, AudioParams(RATE)
    ncache = scache = None
    if cache is not None:
        ncache = store.ClipCache(cache, "normalize", normalize.cache_settings(RATE, norm, 600.0))
        scache = store.ClipCache(cache, "spectrogram", spectrogram.cache_settings(RATE, spec))
    normalize.run(source, manifest, out / "normalize", audio, norm, 600.0, cache=ncache)
    spectrogram.run(out / "normalize", out / "features", out / "images", out / "gallery.png", audio, spec,
                    cache=scache)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def contents(root: Path) -> dict[str, bytes]:
    """``files(root)`` with each packed folder as its clips' rows and its index without offsets.

    What two runs must agree on when the cache linked a file into one of them: the layout
    (which file, which row) may differ, each clip's samples and features may not.
    """
    folders = {"normalize": packed.AUDIO, "features": packed.FEATURES}
    got = {name: data for name, data in files(root).items()
           if not (name.split("/")[0] in folders and (name.endswith(".npy") or name.endswith("index.csv")))}
    for folder, kind in folders.items():
        clips = packed.Packed(root / folder, kind)
        index = fileio.read_csv(root / folder / "index.csv")
        got.update({f"{folder}/{clip_id}": clips.clip(clip_id).tobytes() for clip_id in index["id"]})
        got[f"{folder}/index.csv"] = index.drop(columns=["offset"]).to_csv().encode()
    return got


@pytest.fixture
def counted(monkeypatch):
    """Counts of clips actually normalized and analysed (not taken from the cache)."""
    counts = {"normalize": 0, "spectrogram": 0}
    norm_fn, spec_fn = normalize.normalized_audio, spectrogram.features_of

    def norm_counted(*args, **kwargs):
        counts["normalize"] += 1
        return norm_fn(*args, **kwargs)

    def spec_counted(*args, **kwargs):
        counts["spectrogram"] += kwargs.get("image", True)  # the gallery's own panels are not stage work
        return spec_fn(*args, **kwargs)

    monkeypatch.setattr(normalize, "normalized_audio", norm_counted)
    monkeypatch.setattr(spectrogram, "features_of", spec_counted)
    return counts


def test_miss_then_hit_with_identical_outputs(tmp_path, counted):
    make_manifest(tmp_path)
    plain = run_both(tmp_path, "plain", None)
    assert counted == {"normalize": 4, "spectrogram": 4}
    first = run_both(tmp_path, "first", tmp_path / "cache")
    assert counted == {"normalize": 8, "spectrogram": 8}  # cold cache: everything computed
    second = run_both(tmp_path, "second", tmp_path / "cache")
    assert counted == {"normalize": 8, "spectrogram": 8}  # warm: nothing computed
    for out in (first, second):
        got = files(out)
        assert got == files(plain) and any(name.endswith(".png") for name in got)


def test_warm_spectrogram_reads_no_clip(tmp_path, monkeypatch):
    """Cached clips are found by normalize's clip_sha256 (their features copied): only new clips reach a worker."""
    source, manifest = make_manifest(tmp_path, clips=5)
    full = fileio.read_csv(manifest)
    fileio.write_csv(manifest, full.iloc[:4])
    run_both(tmp_path, "four", tmp_path / "cache")
    tasks = []
    task = spectrogram._clip_task
    monkeypatch.setattr(spectrogram, "_clip_task", lambda record, **kw: tasks.append(record["id"]) or task(record, **kw))
    fileio.write_csv(manifest, full)
    out = run_both(tmp_path, "five", tmp_path / "cache")
    assert tasks == ["c4"]
    assert sorted(p.name for p in (out / "features").iterdir()) == ["features.1.npy", "features.npy", "index.csv",
                                                                     "meta.json"]  # the first run's file, linked
    assert os.stat(out / "features" / "features.npy").st_ino == os.stat(tmp_path / "four" / "features" /
                                                                         "features.npy").st_ino
    assert contents(out) == contents(run_both(tmp_path, "five-plain", None))
    index = fileio.read_csv(out / "normalize" / "index.csv")  # the key: the hash of the clip's samples
    clips = normalize.open_clips(out / "normalize")
    assert index["clip_sha256"].tolist() == [
        hashlib.sha256(normalize.read_clip(clips, i).tobytes()).hexdigest() for i in index["id"]]


def test_a_clip_changed_after_normalize_is_refused_by_name(tmp_path):
    """spectrogram checks a clip it reads against normalize's clip_sha256 (with or without a cache)."""
    make_manifest(tmp_path)
    out = run_both(tmp_path, "a", None)
    clips = normalize.open_clips(out / "normalize")
    offset, samples = clips.ref("c2")
    with open(clips.path, "r+b") as handle:  # silence instead of the tone: same length, other samples
        handle.seek(clips.headers[0] + 4 * offset)
        handle.write(bytes(4 * samples))
    spec = section("spectrogram", SpectrogramParams, images=True, image_size=32, gallery_per_class=1)
    for cache in (None, store.ClipCache(tmp_path / "cache", "spectrogram", spectrogram.cache_settings(RATE, spec))):
        with pytest.raises(DataError, match=r"clips\.npy \(clip c2\): content changed since normalize wrote it"):
            spectrogram.run(out / "normalize", out / "f2", out / "i2", out / "g2.png", AudioParams(RATE), spec,
                            cache=cache)
        assert not (out / "f2").exists()  # nothing half-written under the output's name


def test_new_clips_are_the_only_ones_computed(tmp_path, counted):
    source, manifest = make_manifest(tmp_path, clips=5)
    full = fileio.read_csv(manifest)
    fileio.write_csv(manifest, full.iloc[:4])
    run_both(tmp_path, "four", tmp_path / "cache")
    fileio.write_csv(manifest, full)
    out = run_both(tmp_path, "five", tmp_path / "cache")
    assert counted == {"normalize": 5, "spectrogram": 5}
    assert len(fileio.read_csv(out / "features" / "index.csv")) == 5


def test_params_change_invalidates(tmp_path, counted):
    make_manifest(tmp_path)
    run_both(tmp_path, "a", tmp_path / "cache")
    run_both(tmp_path, "b", tmp_path / "cache", norm=section("normalize", NormalizeParams, target_dbfs=-23.0))
    assert counted == {"normalize": 8, "spectrogram": 8}  # new levels: new clips, so new features too
    spec = section("spectrogram", SpectrogramParams, images=True, n_mels=32, image_size=32, gallery_per_class=1)
    out = run_both(tmp_path, "c", tmp_path / "cache", spec=spec)
    assert counted == {"normalize": 8, "spectrogram": 12}  # same clips (cached), new features
    assert data.load_features(out / "features", "c0").shape[1] == 32
    spec = section("spectrogram", SpectrogramParams, images=True, image_size=48, gallery_per_class=1)
    out = run_both(tmp_path, "d", tmp_path / "cache", spec=spec)
    assert counted["spectrogram"] == 12  # image size: features reused, images rendered from them
    assert files(out) == files(run_both(tmp_path, "d-plain", None, spec=spec))


def test_corrupt_entries_are_recomputed(tmp_path, counted, caplog):
    make_manifest(tmp_path)
    plain = run_both(tmp_path, "plain", None)
    cache = tmp_path / "cache"
    run_both(tmp_path, "first", cache)
    (keys,) = (cache / "normalize").rglob("*.keys.npy")  # the normalized clips, kept whole (one pack)
    keys.write_bytes(keys.read_bytes()[:-10])
    for png in sorted(cache.rglob("*.png"))[:2]:  # PNGs are per-clip entries
        png.unlink()
        png.write_bytes(b"\x89PNG\r\n\x1a\n")
    before = dict(counted)
    with caplog.at_level(logging.WARNING):
        out = run_both(tmp_path, "again", cache)
    assert f"{keys}: unreadable pack" in caplog.text
    assert counted["normalize"] == before["normalize"] + 4  # every clip normalized again
    assert counted["spectrogram"] == before["spectrogram"]  # same clips: features copied, images redrawn
    assert files(out) == files(plain)
    assert len(list((cache / "normalize").rglob("*.keys.npy"))) == 1  # repaired


def test_manifest_without_a_real_sha256_is_not_cached(tmp_path, counted):
    source, manifest = make_manifest(tmp_path)
    frame = fileio.read_csv(manifest)
    frame["sha256"] = "x"
    fileio.write_csv(manifest, frame)
    run_both(tmp_path, "a", tmp_path / "cache")
    run_both(tmp_path, "b", tmp_path / "cache")
    assert counted["normalize"] == 8 and not list((tmp_path / "cache" / "normalize").rglob("*.npy"))


def test_stage_uses_the_cache_from_the_environment(tmp_path, monkeypatch):
    make_manifest(tmp_path)
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", str(tmp_path / "envcache"))
    norm = section("normalize", NormalizeParams)
    normalize.run(tmp_path / "source", tmp_path / "manifest.csv", tmp_path / "n", AudioParams(RATE), norm, 600.0)
    kept = sorted((tmp_path / "envcache" / "normalize").rglob("packs/*"))
    assert len(kept) == 4  # one pack: the array, its keys and its completion marker; the list of outputs
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    normalize.run(tmp_path / "source", tmp_path / "manifest.csv", tmp_path / "n", AudioParams(RATE), norm, 600.0)
    assert sorted((tmp_path / "envcache" / "normalize").rglob("packs/*")) == kept
