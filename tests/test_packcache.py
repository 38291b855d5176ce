"""packcache: the spectrogram stage's features cached as whole packed arrays (packs) and journals."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audiocnn import fileio, packcache, packed, spectrogram, store
from audiocnn.audio import AudioParams
from audiocnn.errors import DataError
from audiocnn.normalize import NormalizeParams
from audiocnn.spectrogram import SpectrogramParams

from test_store import RATE, contents, counted, files, make_manifest, run_both, section  # noqa: F401  (fixture)

WIDTH = 3


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def packed_file(path: Path, clips: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """A packed array of ``clips`` (each (length, WIDTH)) at ``path``; (header bytes, first rows)."""
    first = packed.offsets([len(c) for c in clips])
    header = packed.create(path, int(sum(len(c) for c in clips)), WIDTH)
    with packed.RowWriter(path, header, WIDTH) as writer:
        for offset, rows in zip(first, clips):
            writer.write(int(offset), rows)
    return header, first


def clips_of(lengths, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, WIDTH)).astype(np.float32) for n in lengths]


@pytest.fixture
def cache(tmp_path) -> store.ClipCache:
    return store.ClipCache(tmp_path / "cache", "spectrogram", {"test": 1})


def kept(cache: store.ClipCache, tmp_path: Path, clips: list[np.ndarray], keys: list[str], name: str) -> Path:
    array = tmp_path / f"{name}.npy"
    header, first = packed_file(array, clips)
    packcache.PackCache(cache, WIDTH).keep(array, header, keys, first, [len(c) for c in clips])
    return array


def copy_into(packs: packcache.PackCache, tmp_path: Path, keys: list[str], lengths: list[int]):
    """Look ``keys`` up and copy them into a new packed file; (copied mask, the file's rows per clip)."""
    dest = tmp_path / "dest.npy"
    first = packed.offsets(lengths)
    header = packed.create(dest, int(sum(lengths)), WIDTH)
    copied = packs.copy_rows(packs.find(keys, lengths), str(dest), header, first, lengths)
    array = np.load(dest)
    return copied, [array[o : o + n] for o, n in zip(first, lengths)]


def test_kept_array_is_found_by_key_and_copied_in_any_order(tmp_path, cache):
    clips = clips_of([4, 2, 5, 3])
    kept(cache, tmp_path, clips, [key(i) for i in range(4)], "a")
    packs = packcache.PackCache(cache, WIDTH)
    assert len(packs.load()) == 1
    # reordered, one unknown key, one known key with another length, one that is no sha256
    keys, lengths = [key(2), key(9), key(0), key(1), "not-a-key", key(3)], [5, 2, 4, 7, 3, 3]
    copied, rows = copy_into(packs, tmp_path, keys, lengths)
    assert copied.tolist() == [True, False, True, False, False, True]
    np.testing.assert_array_equal(rows[0], clips[2])
    np.testing.assert_array_equal(rows[2], clips[0])
    np.testing.assert_array_equal(rows[5], clips[3])
    assert not rows[1].any() and not rows[3].any()  # not copied: still the file's zeros


def test_copy_without_copy_file_range_gives_the_same_rows(tmp_path, cache, monkeypatch):
    clips = clips_of([4, 2, 5])
    kept(cache, tmp_path, clips, [key(i) for i in range(3)], "a")

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    packs = packcache.PackCache(cache, WIDTH)
    packs.load()
    copied, rows = copy_into(packs, tmp_path, [key(1), key(0), key(2)], [2, 4, 5])
    assert copied.all()
    for got, want in zip(rows, [clips[1], clips[0], clips[2]]):
        np.testing.assert_array_equal(got, want)


def test_a_pack_changed_in_place_is_discarded_by_name(tmp_path, cache, caplog):
    clips = clips_of([4, 2])
    array = kept(cache, tmp_path, clips, [key(0), key(1)], "a")
    time.sleep(0.02)  # past the file system's timestamp granularity
    with open(array, "r+b") as handle:  # the output (the same file as the pack) edited in place
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\0")
    packs = packcache.PackCache(cache, WIDTH)
    with caplog.at_level(logging.WARNING, logger="audiocnn.packcache"):
        assert packs.load() == []
    assert "changed since it was kept" in caplog.text and str(packs.dir) in caplog.text
    assert not list(packs.dir.glob("*.json"))  # removed


def test_only_the_newest_packs_are_kept(tmp_path, cache):
    for n in range(packcache.KEEP + 2):
        kept(cache, tmp_path, clips_of([3], seed=n), [key(n)], f"run{n}")
        time.sleep(0.02)
    packs = packcache.PackCache(cache, WIDTH)
    assert len(packs.load()) == packcache.KEEP
    found = packs.find([key(n) for n in range(packcache.KEEP + 2)], [3] * (packcache.KEEP + 2))
    assert (found.pack >= 0).tolist() == [False, False, True, True]
    assert len(list(packs.dir.glob("*.npy"))) == 2 * packcache.KEEP  # .npy and .keys.npy each, with its .json
    assert packs.outputs() == [[pack.name] for pack in packs.packs]  # newest first


def test_journal_clips_are_found_torn_records_ignored_and_idle_journals_removed(tmp_path, cache):
    clips = clips_of([4, 2, 5])
    folder = packcache.PackCache(cache, WIDTH).dir
    for i, rows in enumerate(clips):
        packcache.journal_append(folder, key(i), rows)
    packcache.journal_append(folder, "not-a-key", clips[0])  # no key: not journalled
    packcache.close_journal(folder)
    keys_file = next(folder.glob("journal-*.keys"))
    with open(keys_file, "ab") as handle:
        handle.write(b"\x01" * 20)  # a record torn by a kill
    rows_file = keys_file.with_suffix(".rows")
    with open(rows_file, "r+b") as handle:  # the last clip's rows only partly written
        handle.truncate(rows_file.stat().st_size - 4)
    packs = packcache.PackCache(cache, WIDTH)
    assert [p.header for p in packs.load()] == [0]
    copied, rows = copy_into(packs, tmp_path, [key(1), key(0), key(2)], [2, 4, 5])
    assert copied.tolist() == [True, True, False]
    np.testing.assert_array_equal(rows[0], clips[1])
    np.testing.assert_array_equal(rows[1], clips[0])

    live = packcache.Journal(folder, WIDTH)  # another run still writing: its journal stays
    kept(cache, tmp_path, clips[:1], [key(0)], "done")
    assert sorted(folder.glob("journal-*")) == [live.stem.with_suffix(".keys"), live.stem.with_suffix(".rows")]
    live.close()


# --- the spectrogram stage ------------------------------------------------------------------------------------


def test_a_failed_run_resumes_from_its_journal(tmp_path, counted, monkeypatch):
    make_manifest(tmp_path, clips=5)
    plain = run_both(tmp_path, "plain", None)
    computed = counted["spectrogram"]
    features_of = spectrogram.features_of

    def fail_fourth(*args, **kwargs):
        if counted["spectrogram"] - computed == 3 and kwargs.get("image", True):
            raise RuntimeError("disk on fire")
        return features_of(*args, **kwargs)

    monkeypatch.setattr(spectrogram, "features_of", fail_fourth)
    with pytest.raises(DataError, match="disk on fire"):
        run_both(tmp_path, "failed", tmp_path / "cache")
    monkeypatch.setattr(spectrogram, "features_of", features_of)
    folder = next((tmp_path / "cache" / "spectrogram").iterdir()) / "packs"
    assert len(list(folder.glob("journal-*.keys"))) == 1 and not list(folder.glob("*.json"))
    before = counted["spectrogram"]
    out = run_both(tmp_path, "resumed", tmp_path / "cache")
    assert counted["spectrogram"] - before == 2  # the 3 journalled clips are copied, the other 2 computed
    assert files(out) == files(plain)
    assert not list(folder.glob("journal-*")) and len(list(folder.glob("*.json"))) == 1  # now one pack


def test_an_output_edited_in_place_does_not_poison_the_next_run(tmp_path, counted):
    make_manifest(tmp_path)
    plain = run_both(tmp_path, "plain", None)
    first = run_both(tmp_path, "first", tmp_path / "cache")
    time.sleep(0.02)
    array = first / "features" / "features.npy"  # a hard link of the pack
    with open(array, "r+b") as handle:
        handle.seek(-16, os.SEEK_END)
        handle.write(bytes(16))
    before = counted["spectrogram"]
    again = run_both(tmp_path, "again", tmp_path / "cache")
    assert counted["spectrogram"] - before == 4  # the pack was discarded: every clip computed
    assert files(again) == files(plain)


def test_image_size_change_renders_images_from_cached_rows(tmp_path, counted):
    make_manifest(tmp_path)
    run_both(tmp_path, "a", tmp_path / "cache")
    spec = section("spectrogram", SpectrogramParams, images=True, image_size=40, gallery_per_class=1)
    before = counted["spectrogram"]
    out = run_both(tmp_path, "b", tmp_path / "cache", spec=spec)
    assert counted["spectrogram"] == before  # no clip analysed again
    assert files(out) == files(run_both(tmp_path, "b-plain", None, spec=spec))


def test_read_rows_beyond_the_file_is_refused(tmp_path):
    array = tmp_path / "a.npy"
    header, _ = packed_file(array, clips_of([3]))
    np.testing.assert_array_equal(packed.read_rows(array, header, 1, 2, WIDTH), np.load(array)[1:3])
    with pytest.raises(DataError, match="a.npy: rows 2 to 6"):
        packed.read_rows(array, header, 2, 4, WIDTH)


def test_stage_cache_off_keeps_no_pack(tmp_path, monkeypatch):
    make_manifest(tmp_path)
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    spec = section("spectrogram", SpectrogramParams, images=False, gallery_per_class=1)
    out = run_both(tmp_path, "a", None, spec=spec)
    spectrogram.run(out / "normalize", out / "f2", out / "i2", out / "g2.png", AudioParams(RATE), spec)
    assert fileio.read_csv(out / "f2" / "index.csv").shape[0] == 4 and not (tmp_path / "cache").exists()


def test_pool_workers_journal_then_one_pack_covers_every_clip(tmp_path, caplog):
    make_manifest(tmp_path)
    spec = section("spectrogram", SpectrogramParams, images=True, image_size=32, gallery_per_class=1, workers=2)
    first = run_both(tmp_path, "first", tmp_path / "cache", spec=spec)
    folder = next((tmp_path / "cache" / "spectrogram").iterdir()) / "packs"
    assert not list(folder.glob("journal-*"))  # the workers' journals: removed once the pack covered them
    [meta] = folder.glob("*.json")
    assert fileio.read_json(meta)["clips"] == 4
    with caplog.at_level(logging.INFO, logger="audiocnn.spectrogram"):
        second = run_both(tmp_path, "second", tmp_path / "cache", spec=spec)
    assert "4 of 4 clips cached (4 in 1 linked file(s)), computing 0" in caplog.text
    assert files(second) == files(first)


# --- shards: the latest output's packs linked into the next -----------------------------------------------------


def shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "features").glob("features*.npy"))


def test_a_sharded_folder_reads_as_one_array_and_a_clip_across_shards_is_refused(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    first, second = clips_of([3, 2]), clips_of([4], seed=1)
    packed_file(folder / "features.npy", first)
    packed_file(folder / "features.1.npy", second)
    fileio.write_csv(folder / "index.csv", pd.DataFrame({"id": ["a", "b", "c"], "offset": [0, 3, 5],
                                                          "frames": [3, 2, 4]}))
    features = packed.Packed(folder)
    assert features.shape == (9, WIDTH) and features.paths == packed.shard_paths(folder, packed.FEATURES)
    for clip_id, rows in zip("abc", first + second):
        np.testing.assert_array_equal(features.clip(clip_id), rows)
    fileio.write_csv(folder / "index.csv", pd.DataFrame({"id": ["a", "b"], "offset": [0, 4], "frames": [3, 2]}))
    with pytest.raises(DataError, match=r"index.csv: clip b has rows 4\+2 outside .*features.npy and 1 more shard"):
        packed.Packed(folder)


def test_clips_added_go_to_a_new_shard_and_each_run_links_the_latest_files(tmp_path, counted, monkeypatch):
    """Adding one clip per run: only it is computed and written; past MAX_SHARDS the newest shards merge."""
    monkeypatch.setattr(packcache, "MAX_SHARDS", 3)
    source, manifest = make_manifest(tmp_path, clips=7)
    full = fileio.read_csv(manifest)
    fileio.write_csv(manifest, full.iloc[:3])
    run_both(tmp_path, "run3", tmp_path / "cache")
    expected = [["features.npy"], ["features.1.npy", "features.npy"]] + [["features.1.npy", "features.2.npy",
                                                                          "features.npy"]] * 3
    for clips, names in zip(range(4, 8), expected[1:]):
        fileio.write_csv(manifest, full.iloc[:clips])
        before = counted["spectrogram"]
        out = run_both(tmp_path, f"run{clips}", tmp_path / "cache")
        assert counted["spectrogram"] - before == 1, clips  # only the new clip
        assert shard_names(out) == names, clips
        previous = tmp_path / f"run{clips - 1}" / "features"
        assert os.stat(out / "features" / "features.npy").st_ino == os.stat(previous / "features.npy").st_ino
        assert contents(out) == contents(run_both(tmp_path, f"plain{clips}", None)), clips
    spec = section("spectrogram", SpectrogramParams, images=True, image_size=32, gallery_per_class=1)  # run_both's
    packs = packcache.PackCache(store.ClipCache(tmp_path / "cache", "spectrogram",
                                                spectrogram.cache_settings(RATE, spec)), spec.n_mels)
    packs.load()
    assert packs.latest == 3 and len(packs.outputs()) == packcache.KEEP  # every shard of the latest output kept


def test_a_cache_on_another_file_system_copies_instead_of_linking(tmp_path, counted, monkeypatch):
    source, manifest = make_manifest(tmp_path, clips=5)
    full = fileio.read_csv(manifest)
    fileio.write_csv(manifest, full.iloc[:4])
    run_both(tmp_path, "four", tmp_path / "cache")

    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # packs kept as copies, no file linked into an output
    fileio.write_csv(manifest, full)
    before = counted["spectrogram"]
    out = run_both(tmp_path, "five", tmp_path / "cache")
    assert counted["spectrogram"] - before == 1 and shard_names(out) == ["features.npy"]
    assert files(out) == files(run_both(tmp_path, "five-plain", None))  # rows copied: a plain run's bytes


def test_a_pack_mostly_unused_is_copied_from_not_linked(tmp_path, counted):
    source, manifest = make_manifest(tmp_path, clips=4)
    run_both(tmp_path, "all", tmp_path / "cache")
    fileio.write_csv(manifest, fileio.read_csv(manifest).iloc[:1])  # one short clip: under REUSE_FRACTION of the rows
    before = counted["spectrogram"]
    out = run_both(tmp_path, "one", tmp_path / "cache")
    assert counted["spectrogram"] == before and shard_names(out) == ["features.npy"]
    assert os.stat(out / "features" / "features.npy").st_ino != os.stat(tmp_path / "all" / "features" /
                                                                         "features.npy").st_ino
    assert files(out) == files(run_both(tmp_path, "one-plain", None))  # copied: the very bytes of a plain run


@pytest.mark.parametrize("trim_db", [0.0, 30.0])  # rows laid out in advance / appended as computed
def test_normalize_links_the_previous_clips_file_and_writes_only_the_new_clips(tmp_path, counted, trim_db):
    source, manifest = make_manifest(tmp_path, clips=5)
    full = fileio.read_csv(manifest)
    fileio.write_csv(manifest, full.iloc[:4])
    norm = section("normalize", NormalizeParams, trim_db=trim_db)
    run_both(tmp_path, "four", tmp_path / "cache", norm=norm)
    fileio.write_csv(manifest, full)
    before = counted["normalize"]
    out = run_both(tmp_path, "five", tmp_path / "cache", norm=norm)
    assert counted["normalize"] - before == 1
    assert sorted(p.name for p in (out / "normalize").glob("*.npy")) == ["clips.1.npy", "clips.npy"]
    assert os.stat(out / "normalize" / "clips.npy").st_ino == os.stat(tmp_path / "four" / "normalize" /
                                                                       "clips.npy").st_ino
    assert packed.Packed(out / "normalize", packed.AUDIO).shape[0] == sum(
        packed.Packed(out / "normalize", packed.AUDIO).refs[clip_id][1] for clip_id in full["id"])  # nothing else
    again = run_both(tmp_path, "again", tmp_path / "cache", norm=norm)  # both files linked, nothing written
    assert counted["normalize"] - before == 1
    assert contents(out) == contents(run_both(tmp_path, "plain", None, norm=norm)) == contents(again)
    assert [os.stat(again / "normalize" / name).st_ino for name in ("clips.npy", "clips.1.npy")] == [
        os.stat(out / "normalize" / name).st_ino for name in ("clips.npy", "clips.1.npy")]


def test_an_unchanged_gallery_computes_no_log_mel(tmp_path, monkeypatch):
    make_manifest(tmp_path)
    run_both(tmp_path, "a", tmp_path / "cache")
    panels = []
    features_of = spectrogram.features_of
    monkeypatch.setattr(spectrogram, "features_of",
                        lambda *a, **kw: panels.append(1) or features_of(*a, **kw))
    out = run_both(tmp_path, "b", tmp_path / "cache")
    assert panels == [] and files(out)["gallery.png"] == files(tmp_path / "a")["gallery.png"]


# --- appending in order (normalize) ---------------------------------------------------------------------------


EXTRA = np.dtype([("tag", "S32"), ("flag", "?")])


def test_append_rows_copies_runs_in_order_with_the_entry_fields(tmp_path, cache):
    clips = clips_of([4, 2, 5, 3])
    array = tmp_path / "a.npy"
    header, first = packed_file(array, clips)
    extra = np.zeros(4, EXTRA)
    extra["tag"] = [bytes([i]) * 31 + b"\0" for i in range(4)]  # a digest ending in a zero byte
    extra["flag"] = [True, False, False, True]
    packcache.PackCache(cache, WIDTH, EXTRA).keep(array, header, [key(i) for i in range(4)], first,
                                                  [4, 2, 5, 3], extra)
    packs = packcache.PackCache(cache, WIDTH, EXTRA)
    assert len(packs.load()) == 1
    found = packs.find([key(9), key(1), key(2), key(0)])  # no lengths: learnt from the pack
    assert found.pack.tolist() == [-1, 0, 0, 0] and found.length.tolist() == [0, 2, 5, 4]
    assert found.entry["flag"].tolist() == [False, False, False, True]
    assert packcache.hex_digests(found.entry["tag"][1:2]) == [(bytes([1]) * 31 + b"\0").hex()]
    calls = []
    copy_range = packed.copy_range
    with packed.Appender(tmp_path / "out.npy", WIDTH) as out:
        out.append(np.ones((3, WIDTH), np.float32))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(packed, "copy_range", lambda *a: calls.append(a) or copy_range(*a))
            offsets = packs.append_rows(found, np.array([1, 2, 3]), out)
    assert offsets == [3, 5, 10] and len(calls) == 2  # clips 1 and 2 follow each other in the pack: one copy
    whole = np.load(tmp_path / "out.npy")
    assert whole.shape == (14, WIDTH)
    for offset, want in zip(offsets, [clips[1], clips[2], clips[0]]):
        np.testing.assert_array_equal(whole[offset : offset + len(want)], want)
    assert packcache.PackCache(cache, WIDTH).load() == []  # without the entry fields: not its pack (removed)


def test_a_copy_failing_midway_leaves_the_appended_file_consistent(tmp_path, cache, caplog):
    clips = clips_of([4, 2])
    array = kept(cache, tmp_path, clips, [key(0), key(1)], "a")
    packs = packcache.PackCache(cache, WIDTH)
    packs.load()
    found = packs.find([key(0), key(1)])  # one run of 6 rows
    copy_range = packed.copy_range

    def half_then_fail(in_fd, out_fd, count, in_pos, out_pos):
        copy_range(in_fd, out_fd, count // 2, in_pos, out_pos)  # some bytes land, then the disk fails
        raise OSError(errno.EIO, "I/O error")

    with packed.Appender(tmp_path / "out.npy", WIDTH) as out:
        with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="audiocnn.packcache"):
            mp.setattr(packed, "copy_range", half_then_fail)
            assert packs.append_rows(found, np.array([0, 1]), out) == []
        out.append(clips[1])  # the caller computes the clips instead
    assert "recomputing its clips" in caplog.text and str(array.name) not in os.listdir(packs.dir)
    assert (tmp_path / "out.npy").stat().st_size == packed.HEADER_BYTES + clips[1].nbytes  # nor 3 rows half-copied
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), clips[1])


def test_hex_digests_keep_trailing_zero_bytes():
    raw = np.array([bytes(32), b"\xab" * 31 + b"\0"], "S32")
    assert packcache.hex_digests(raw) == ["00" * 32, "ab" * 31 + "00"]
