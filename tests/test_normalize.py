"""normalize: level math, mono downmix, resampling, trimming, the stage end to end."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from audiocnn import config, fileio, normalize, packed, parallel, spill, store
from audiocnn.audio import AudioParams
from audiocnn.config import ParamsError
from audiocnn.normalize import NormalizeParams
from audiocnn.parallel import ClipError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _feature_cache_in_tmp(tmp_path, monkeypatch):
    """Stage runs here use a throwaway feature cache, never the repo's .cache/audiocnn."""
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", str(tmp_path / "feature-cache"))


def norm_params(**overrides) -> NormalizeParams:
    section = {**config.read_params(REPO / "params.yaml")["normalize"], "workers": 1, **overrides}
    return config.load_section({"normalize": section}, "normalize", NormalizeParams)


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dbfs(x: float) -> float:
    return 20 * np.log10(x)


def test_params_validation_names_the_key():
    with pytest.raises(ParamsError, match=r"^normalize\.target_dbfs=3\.0 must be"):
        norm_params(target_dbfs=3.0)
    with pytest.raises(ParamsError, match=r"^normalize\.trim_db=-1\.0 must be >= 0"):
        norm_params(trim_db=-1.0)
    with pytest.raises(ParamsError, match=r"normalize\.method='loud' must be one of"):
        norm_params(method="loud")


def test_max_duration_from_raw_params():
    assert normalize.max_duration_from({"ingest": {"max_duration": 600}}) == 600.0
    with pytest.raises(ParamsError, match=r"ingest\.max_duration is missing"):
        normalize.max_duration_from({"ingest": {}})
    with pytest.raises(ParamsError, match=r"ingest\.max_duration='long' must be a positive"):
        normalize.max_duration_from({"ingest": {"max_duration": "long"}})
    with pytest.raises(ParamsError, match=r"ingest\.max_duration=0 must be a positive"):
        normalize.max_duration_from({"ingest": {"max_duration": 0}})


def test_mono_downmix_is_the_channel_mean():
    stereo = np.stack([np.full(10, 0.2, np.float32), np.full(10, -0.6, np.float32)], axis=1)  # (frames, 2)
    mono = normalize.to_mono(stereo)
    assert mono.shape == (10,) and mono.dtype == np.float32
    np.testing.assert_allclose(mono, -0.2, atol=1e-7)


@pytest.mark.parametrize("rate_in", [8000, 22050, 44100])
def test_resample_length_and_pitch(rate_in):
    out = normalize.resample(tone(1.0, rate_in, freq=1000.0), rate_in, 16000)
    assert out.dtype == np.float32 and abs(out.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(out[: 16000 // 2 * 2]))
    assert abs(np.argmax(spectrum) * 16000 / (16000 // 2 * 2) - 1000.0) <= 2.0


def test_dc_removed_and_peak_level():
    x = tone(0.5, 16000) + 0.3  # DC offset
    out = normalize.normalize_signal(x[:, None], 16000, 16000, norm_params(method="peak", target_dbfs=-3.0))
    assert abs(float(out.mean())) < 1e-4
    assert dbfs(np.abs(out).max()) == pytest.approx(-3.0, abs=1e-3)


def test_rms_level():
    out = normalize.normalize_signal(tone(0.5, 16000)[:, None], 16000, 16000, norm_params(target_dbfs=-20.0))
    assert dbfs(np.sqrt(np.mean(out.astype(np.float64) ** 2))) == pytest.approx(-20.0, abs=1e-3)


def test_rms_gain_limited_below_full_scale():
    x = np.zeros(16000, np.float32)
    x[100] = 1.0  # one click: its RMS is -42 dBFS, so -3 dBFS RMS would need +39 dB of gain
    out = normalize.normalize_level(x - x.mean(), "rms", -3.0)
    assert dbfs(np.abs(out).max()) == pytest.approx(-0.1, abs=1e-3)


def test_trim_cuts_quiet_ends_to_the_block():
    rate, hop = 16000, 160
    x = np.concatenate([np.zeros(4000), tone(0.5, rate), 0.001 * tone(0.25, rate)]).astype(np.float32)
    out = normalize.trim_silence(x, 30.0, hop)
    assert 8000 <= out.size <= 8000 + 2 * hop
    np.testing.assert_array_equal(normalize.trim_silence(x, 0.0, hop), x)  # 0 = off
    np.testing.assert_array_equal(normalize.trim_silence(x, 80.0, hop), x[4000:])  # -60 dB tail kept


def test_trim_never_trims_to_nothing():
    x = np.zeros(1600, np.float32)
    x[800] = 0.5
    out = normalize.trim_silence(x, 10.0, 160)
    assert out.size == 160 and out.max() == 0.5
    short = np.full(100, 0.1, np.float32)
    assert normalize.trim_silence(short, 10.0, 160).size == 100


def test_silent_clip_stays_zero():
    out = normalize.normalize_signal(np.zeros((8000, 2), np.float32), 8000, 16000, norm_params(trim_db=40.0))
    assert out.size == 16000 and np.all(out == 0) and np.all(np.isfinite(out))


def make_source(tmp_path: Path) -> tuple[Path, Path]:
    """Three WAV files (stereo 22.05 kHz, mono 8 kHz, 3 s mono 16 kHz) and their manifest."""
    source = tmp_path / "source"
    (source / "a").mkdir(parents=True)
    stereo = np.stack([tone(0.5, 22050, 300.0), tone(0.5, 22050, 500.0, 0.1)], axis=1)
    sf.write(source / "a" / "st.wav", stereo, 22050)
    sf.write(source / "a" / "lo.wav", tone(0.7, 8000, 200.0, 0.01), 8000, subtype="PCM_16")
    sf.write(source / "a" / "long.wav", tone(3.0, 16000), 16000)
    rows = [("st-1", "a/st.wav"), ("lo-2", "a/lo.wav"), ("long-3", "a/long.wav")]
    manifest = tmp_path / "manifest.csv"
    fileio.write_csv(manifest, pd.DataFrame([{"id": i, "path": p, "label": "a", "group": "", "fold": "",
                                              **true_length(source / p), "sha256": "x"} for i, p in rows]))
    return source, manifest


def true_length(path: Path) -> dict:
    """The manifest's duration, sample_rate and channels of one file, as ingest writes them."""
    info = sf.info(path)
    return {"duration": info.frames / info.samplerate, "sample_rate": info.samplerate, "channels": info.channels}


def with_hashes(source: Path, manifest: Path) -> pd.DataFrame:
    """The manifest with each file's real sha256 (what ingest writes), written back."""
    index = fileio.read_csv(manifest)
    index["sha256"] = [hashlib.sha256((source / p).read_bytes()).hexdigest() for p in index["path"]]
    fileio.write_csv(manifest, index)
    return index


def test_run_writes_contract_outputs_same_for_1_and_2_workers(tmp_path):
    source, manifest = make_source(tmp_path)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        normalize.run(source, manifest, out, AudioParams(16000), norm_params(workers=workers), max_seconds=2.0)
        outs.append(out)
    index = fileio.read_csv(outs[0] / "index.csv")
    assert list(index.columns) == [*fileio.read_csv(manifest).columns, "offset", "samples", "clip_sha256"]
    assert index["samples"].astype(int).tolist() == [8000, 11200, 32000]  # 0.5 s, 0.7 s, capped at 2 s
    assert index["offset"].astype(int).tolist() == [0, 8000, 19200]  # packed in manifest order
    whole = np.load(outs[0] / "clips.npy", allow_pickle=False)  # one ordinary .npy: (total samples, 1)
    assert whole.dtype == np.float32 and whole.shape == (51200, 1)
    clips = normalize.open_clips(outs[0])
    for clip_id, start, samples, digest in zip(index["id"], index["offset"].astype(int), index["samples"].astype(int),
                                               index["clip_sha256"]):
        a = normalize.read_clip(clips, clip_id)
        assert a.dtype == np.float32 and a.shape == (samples,)
        np.testing.assert_array_equal(a, whole[start : start + samples, 0])
        assert hashlib.sha256(a.astype("<f4").tobytes()).hexdigest() == digest
    the_same = [(outs[0] / name).read_bytes() == (outs[1] / name).read_bytes() for name in ("clips.npy", "index.csv")]
    assert the_same == [True, True]  # the number of workers changes nothing
    assert sorted(p.name for p in outs[1].iterdir()) == ["clips.npy", "index.csv"]  # no spill files left


def test_planned_lengths_are_the_computed_ones(tmp_path):
    source, manifest = make_source(tmp_path)
    index = fileio.read_csv(manifest)
    for rate, max_seconds, expected in [(16000, 2.0, [8000, 11200, 32000]), (16000, 99.0, [8000, 11200, 48000]),
                                        (8000, math.inf, [4000, 5600, 24000]), (44100, 0.3, [13230, 13230, 13230])]:
        lengths = normalize.planned_lengths(index, rate, norm_params(), max_seconds)
        computed = [normalize.normalized_audio(r, source, rate, norm_params(), max_seconds).size
                    for r in fileio.records(index)]
        assert lengths.tolist() == computed == expected
    assert normalize.planned_lengths(index, 16000, norm_params(trim_db=30.0), 2.0) is None  # trimming: unknown
    assert normalize.planned_lengths(index.drop(columns=["duration"]), 16000, norm_params(), 2.0) is None
    assert normalize.planned_lengths(index.assign(sample_rate="?"), 16000, norm_params(), 2.0) is None


def test_pool_workers_write_clips_in_place_when_lengths_are_known(tmp_path, monkeypatch):
    """With the manifest's lengths no sample passes through the parent: not piped, not spilled, not copied."""
    source, manifest = make_source(tmp_path)
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    for method in ("append", "append_spilled", "append_copy"):
        monkeypatch.setattr(packed.Appender, method, lambda *a: pytest.fail("a clip passed through the parent"))
    normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(workers=2), max_seconds=2.0)
    assert fileio.read_csv(tmp_path / "out" / "index.csv")["samples"].astype(int).tolist() == [8000, 11200, 32000]


def test_unknown_lengths_come_back_through_spill_files(tmp_path, monkeypatch):
    """Trimming (lengths unknown in advance), 2 workers: the parent gets where each clip lies (bounded memory)."""
    source, manifest = make_source(tmp_path)
    received = []
    append_spilled = packed.Appender.append_spilled
    monkeypatch.setattr(packed.Appender, "append_spilled",
                        lambda self, rows: received.append(rows) or append_spilled(self, rows))
    monkeypatch.setattr(packed.Appender, "append", lambda *a: pytest.fail("samples came back through the pipe"))
    params = norm_params(workers=2, trim_db=30.0)
    normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), params, max_seconds=2.0)
    assert [r.rows for r in received] == [8000, 11200, 32000]  # (tones: nothing to trim)
    assert all(r.path.startswith(str(tmp_path)) and ".spill" in r.path for r in received)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clips.npy", "index.csv"]
    monkeypatch.undo()
    normalize.run(source, manifest, tmp_path / "one", AudioParams(16000), norm_params(workers=1, trim_db=30.0),
                  max_seconds=2.0)
    for name in ("clips.npy", "index.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_mispredicted_length_falls_back_to_appending(tmp_path, monkeypatch, caplog, workers):
    """A manifest whose duration is off gives the same clips (appended), a warning naming the file,
    and no clip is read twice: those computed before the fallback are in the journals."""
    source, manifest = make_source(tmp_path)
    normalize.run(source, manifest, tmp_path / "right", AudioParams(16000), norm_params(), max_seconds=2.0,
                  cache=None)
    index = with_hashes(source, manifest)
    index.loc[1, "duration"] = "0.5"  # lo.wav lasts 0.7 s
    fileio.write_csv(manifest, index)
    read = []
    read_audio = normalize.read_audio
    monkeypatch.setattr(normalize, "read_audio", lambda path, *a: read.append(Path(path).name) or read_audio(path, *a))
    with caplog.at_level("WARNING", logger="audiocnn.normalize"):
        normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(workers=workers),
                      max_seconds=2.0)
    assert "a/lo.wav: 11200 samples, not the 8000" in caplog.text
    assert (tmp_path / "out" / "clips.npy").read_bytes() == (tmp_path / "right" / "clips.npy").read_bytes()
    columns = ["offset", "samples", "clip_sha256"]
    assert fileio.read_csv(tmp_path / "out" / "index.csv")[columns].equals(
        fileio.read_csv(tmp_path / "right" / "index.csv")[columns])
    if workers == 1:  # (a pool's workers read in their own processes)
        assert read == ["st.wav", "lo.wav", "long.wav"]


def test_clips_come_from_the_cache_when_the_source_is_unchanged(tmp_path, monkeypatch):
    """A rerun reads no source file whose sha256 the cache holds, and writes the same bytes."""
    source, manifest = make_source(tmp_path)
    with_hashes(source, manifest)
    normalize.run(source, manifest, tmp_path / "cold", AudioParams(16000), norm_params(workers=2), max_seconds=2.0)
    monkeypatch.setattr(normalize, "read_audio", lambda *a: pytest.fail("a cached clip was read from the source"))
    normalize.run(source, manifest, tmp_path / "warm", AudioParams(16000), norm_params(workers=1), max_seconds=2.0)
    for name in ("clips.npy", "index.csv"):
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "warm" / name).read_bytes()


def test_new_clips_are_computed_between_cached_ones_and_silence_is_remembered(tmp_path, monkeypatch, caplog):
    """Cached and new clips interleave in manifest order; a cached silent clip is still reported as silent."""
    source, manifest = make_source(tmp_path)
    sf.write(source / "a" / "quiet.wav", np.zeros(4000, np.float32), 8000)
    index = fileio.read_csv(manifest)
    index = pd.concat([index, index.iloc[[0]].assign(id="quiet-4", path="a/quiet.wav",
                                                     **true_length(source / "a" / "quiet.wav"))], ignore_index=True)
    fileio.write_csv(manifest, index)
    full = with_hashes(source, manifest)
    fileio.write_csv(manifest, full.iloc[[0, 3]])  # cached: st, quiet
    normalize.run(source, manifest, tmp_path / "two", AudioParams(16000), norm_params(), max_seconds=2.0)
    fileio.write_csv(manifest, full.iloc[[1, 0, 2, 3]])  # lo and long are new, around the cached st
    read = []
    read_audio = normalize.read_audio
    monkeypatch.setattr(normalize, "read_audio", lambda path, *a: read.append(Path(path).name) or read_audio(path, *a))
    caplog.clear()
    with caplog.at_level("WARNING", logger="audiocnn.normalize"):
        normalize.run(source, manifest, tmp_path / "four", AudioParams(16000), norm_params(workers=1),
                      max_seconds=2.0)
    assert read == ["lo.wav", "long.wav"]
    assert "1 silent clip(s)" in caplog.text and "a/quiet.wav" in caplog.text
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    normalize.run(source, manifest, tmp_path / "plain", AudioParams(16000), norm_params(), max_seconds=2.0)
    four, plain = (packed.Packed(tmp_path / name, packed.AUDIO) for name in ("four", "plain"))
    assert [p.name for p in four.paths] == ["clips.npy", "clips.1.npy"]  # the first run's file linked, then lo, long
    for clip_id in full["id"]:
        np.testing.assert_array_equal(four.clip(clip_id), plain.clip(clip_id))
    assert (fileio.read_csv(tmp_path / "four" / "index.csv").drop(columns=["offset"]).equals(
        fileio.read_csv(tmp_path / "plain" / "index.csv").drop(columns=["offset"])))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_run_resumes_from_its_journal(tmp_path, monkeypatch, workers):
    """Clips normalized before a failure (here or in pool workers) are not normalized again by the next run."""
    source, manifest = make_source(tmp_path)
    with_hashes(source, manifest)
    good = (source / "a" / "long.wav").read_bytes()
    (source / "a" / "long.wav").write_bytes(b"not audio")  # (its manifest sha256 is the good file's)
    with pytest.raises(ClipError, match=r"a/long\.wav"):
        normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(workers=workers),
                      max_seconds=2.0)
    assert 1 <= len(list((tmp_path / "feature-cache").rglob("journal-*.rows"))) <= workers
    (source / "a" / "long.wav").write_bytes(good)
    read = []
    read_audio = normalize.read_audio
    monkeypatch.setattr(normalize, "read_audio", lambda path, *a: read.append(Path(path).name) or read_audio(path, *a))
    normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(), max_seconds=2.0)
    assert read == ["long.wav"]
    assert not list((tmp_path / "feature-cache").rglob("journal-*"))  # covered by the new pack: removed
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", "off")
    normalize.run(source, manifest, tmp_path / "plain", AudioParams(16000), norm_params(), max_seconds=2.0)
    for name in ("clips.npy", "index.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_a_failed_run_leaves_no_output(tmp_path):
    """A clip failing half way through leaves neither the folder nor a half-written clips.npy under its name."""
    source, manifest = make_source(tmp_path)
    normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(), max_seconds=2.0)
    (source / "a" / "long.wav").write_bytes(b"not audio")
    with pytest.raises(ClipError, match=r"a/long\.wav"):
        normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(workers=2), max_seconds=2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature-cache", "manifest.csv", "source"]


def test_run_error_names_the_clip(tmp_path):
    source, manifest = make_source(tmp_path)
    (source / "a" / "lo.wav").write_bytes(b"not audio")
    with pytest.raises(ClipError, match=r"a/lo\.wav"):
        normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(), max_seconds=2.0)


def test_non_finite_samples_are_a_data_error(tmp_path):
    source, manifest = make_source(tmp_path)
    bad = tone(0.5, 16000)
    bad[100] = np.nan
    sf.write(source / "a" / "long.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(ClipError, match=r"a/long\.wav: .*1 NaN/Inf sample"):
        normalize.run(source, manifest, tmp_path / "out", AudioParams(16000), norm_params(), max_seconds=2.0)


def test_stage_script(tmp_path):
    source, manifest = make_source(tmp_path)
    params = config.read_params(REPO / "params.yaml")
    params["normalize"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main = runpy.run_path(str(REPO / "stages" / "normalize.py"))["main"]
    main(["--params", str(tmp_path / "params.yaml"), "--source", str(source), "--manifest", str(manifest),
          "--out", str(tmp_path / "out")])
    assert len(normalize.open_clips(tmp_path / "out").refs) == 3


def _square_or_fail(item: dict) -> int:
    if item["x"] == 7:
        raise ValueError("seven is not allowed")
    return item["x"] ** 2


@pytest.mark.parametrize("workers", [1, 2])
def test_map_clips_keeps_order_and_names_the_failing_clip(workers):
    items = [{"path": f"c/{x}.wav", "x": x} for x in range(40)]
    assert parallel.map_clips(_square_or_fail, items[:7] + items[8:], workers, "t") == [
        x * x for x in range(40) if x != 7]
    with pytest.raises(ClipError, match=r"^c/7\.wav: ValueError: seven is not allowed$") as err:
        parallel.map_clips(_square_or_fail, items, workers, "t")
    assert "_square_or_fail" in err.value.detail  # the worker's traceback survives the process boundary
    assert parallel.resolve_workers(0) >= 1
    ran = []
    assert parallel.map_clips(_square_or_fail, items[:3], workers, "t", meanwhile=lambda: ran.append(1)) == [0, 1, 4]
    assert ran == [1]  # the side job ran once, in this process


@pytest.mark.parametrize("workers", [1, 2])
def test_iter_clips_streams_in_order_and_names_the_failing_clip(workers):
    items = [{"path": f"c/{x}.wav", "x": x} for x in range(300)]
    assert list(parallel.iter_clips(_square_or_fail, items[:7] + items[8:], workers, "t")) == [
        x * x for x in range(300) if x != 7]
    received = []
    with pytest.raises(ClipError, match=r"^c/7\.wav: ValueError: seven is not allowed$"):
        for result in parallel.iter_clips(_square_or_fail, items, workers, "t"):
            received.append(result)
    assert received == [x * x for x in range(len(received))] and len(received) <= 7  # in order, up to the failure
    early = parallel.iter_clips(_square_or_fail, items[8:], workers, "t")
    assert next(early) == 64
    early.close()  # a consumer that stops early cancels the rest (no hang, no error)


def _unnamed(item: dict) -> str:
    raise AssertionError(f"item {item['x']} named though it did not fail")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_item_is_named_only_when_it_fails(workers):
    """``name`` runs for a failing item alone (no list of every item's name), here over rows built on demand."""
    rows = fileio.Rows({"path": [f"c/{x}.wav" for x in range(40)], "x": list(range(40))})
    fine = fileio.Rows(rows.columns, at=[x for x in range(40) if x != 7])
    assert parallel.map_clips(_square_or_fail, fine, workers, "t", name=_unnamed) == [x * x for x in fine.at]
    assert list(parallel.iter_clips(_square_or_fail, fine, workers, "t", name=_unnamed)) == [x * x for x in fine.at]
    with pytest.raises(ClipError, match=r"^clip 7 \(c/7\.wav\): ValueError: seven is not allowed$"):
        parallel.map_clips(_square_or_fail, rows, workers, "t", name=lambda item: f"clip {item['x']} ({item['path']})")


def test_spawned_workers_get_the_names_of_their_items(monkeypatch):
    """Without fork, a task carries its items' names: ``name`` may be a lambda, which does not pickle."""
    monkeypatch.setattr(parallel, "_start_method", lambda: "spawn")
    rows = fileio.Rows({"path": [f"c/{x}.wav" for x in range(12)], "x": list(range(12))})
    with pytest.raises(ClipError, match=r"^clip 7: ValueError: seven is not allowed$"):
        parallel.map_clips(_square_or_fail, rows, 2, "t", name=lambda item: f"clip {item['x']}")
    assert parallel.map_clips(_square_or_fail, rows[:7], 2, "t", name=lambda item: f"clip {item['x']}") == [
        x * x for x in range(7)]


def test_pool_tasks_are_large_for_map_clips_small_for_streamed_results_and_balanced():
    assert parallel._chunk_size(30000, 2, parallel.MAP_CHUNK) == parallel.MAP_CHUNK == 256
    assert parallel._chunk_size(30000, 2, parallel.STREAM_CHUNK) == parallel.STREAM_CHUNK == 32
    assert parallel._chunk_size(3000, 2, parallel.MAP_CHUNK) == 188  # 16 tasks: 8 per worker
    assert parallel._chunk_size(5, 2, parallel.MAP_CHUNK) == 1
    items = [{"path": f"c/{x}.wav", "x": x} for x in range(600)]
    assert list(parallel.iter_clips(_square_or_fail, items[8:], 2, "t", chunk=parallel.MAP_CHUNK)) == [
        x * x for x in range(8, 600)]  # larger streamed tasks (normalize's planned rows): still in order


def test_per_clip_loops_leave_the_stage_process_one_blas_thread():
    """A second BLAS thread in the stage's own process spins on a core a worker needs (``one_blas_thread``)."""
    code = ("import numpy, threadpoolctl\n"
            "from audiocnn import parallel\n"
            "blas = lambda: sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'})\n"
            "before = blas()\n"
            "assert parallel.map_clips(len, [{'path': str(x)} for x in range(4)], 2, 't') == [1] * 4\n"
            "print(before, blas())\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "[2] [1]"


@pytest.mark.parametrize("script", ["normalize", "spectrogram"])
def test_per_clip_stage_scripts_start_no_blas_thread_pool_unless_the_user_asks(script):
    """``audiocnn.single_blas`` comes before numpy in the per-clip stage scripts; a user's setting is kept."""
    code = ("import runpy, sys, threadpoolctl\n"
            f"runpy.run_path({str(REPO / 'stages' / f'{script}.py')!r})\n"  # the script's imports, not its main
            "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO / "src")
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.strip()
    assert run(env) == "[1]"
    assert run({**env, "OPENBLAS_NUM_THREADS": "2"}) == "[2]"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="workers are spawned here")
def test_forked_workers_inherit_the_work_instead_of_unpickling_it():
    lock = threading.Lock()  # neither a lock nor a lambda pickles: only inheritance gets them to a worker
    items = [{"path": f"c/{x}.wav", "x": x, "lock": lock} for x in range(100)]
    plus_one = lambda item: item["x"] + 1  # noqa: E731
    assert parallel.map_clips(plus_one, items, 2, "t") == list(range(1, 101))
    assert list(parallel.iter_clips(plus_one, items, 2, "t")) == list(range(1, 101))
    with pytest.raises(ClipError, match="c/7.wav"):
        parallel.map_clips(_square_or_fail, [{"path": f"c/{x}.wav", "x": x} for x in range(40)], 2, "t")
    assert parallel._FORKED_WORK == {}  # each run's list is dropped when its pool is done, failed or not


def test_appender_copies_spilled_rows_in_order_one_copy_per_run(tmp_path, monkeypatch):
    """Rows spilled by (here: two) workers land where the Appender announced; consecutive ones in one copy."""
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((n, 2)).astype(np.float32) for n in (3, 4, 2, 5, 1)]
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    copies = []
    copy_range = packed.copy_range
    monkeypatch.setattr(packed, "copy_range", lambda *a: copies.append(a[2]) or copy_range(*a))
    with packed.Appender(tmp_path / "a.npy", width=2) as appender:
        spilled = [spill.spill(tmp_path / "w1", clips[0]), spill.spill(tmp_path / "w1", clips[1]),
                   spill.spill(tmp_path / "w2", clips[2])]
        offsets = [appender.append_spilled(spilled[0]), appender.append_spilled(spilled[1]),
                   appender.append(clips[3]), appender.append_spilled(spilled[2]),
                   appender.append_spilled(spill.spill(tmp_path / "w1", clips[4]))]
    assert offsets == [0, 3, 7, 12, 14]
    order = [clips[0], clips[1], clips[3], clips[2], clips[4]]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), np.concatenate(order))
    assert copies == [7 * 8, 2 * 8, 1 * 8]  # bytes per copy: clips 0 and 1 in one run
    short = spill.Spilled(spilled[2].path, 0, 99)  # more rows than the file holds
    with pytest.raises(OSError):
        with packed.Appender(tmp_path / "b.npy", width=2) as appender:
            appender.append_spilled(short)
    with pytest.raises(ValueError):
        np.load(tmp_path / "b.npy", allow_pickle=False)  # never taken for an array


def test_appender_writes_an_ordinary_npy_and_a_failure_no_array(tmp_path):
    with packed.Appender(tmp_path / "a.npy", width=2) as appender:
        assert appender.append(np.ones((3, 2), np.float32)) == 0
        assert appender.append(np.zeros((1, 2), np.float64)) == 3  # stored as float32
        with pytest.raises(ValueError, match=r"a\.npy: rows of shape \(2, 3\)"):
            appender.append(np.zeros((2, 3), np.float32))
    loaded = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert loaded.dtype == np.float32 and loaded.tolist() == [[1, 1], [1, 1], [1, 1], [0, 0]]
    assert (tmp_path / "a.npy").read_bytes() == store.npy_bytes(loaded)  # the bytes np.save writes
    with pytest.raises(RuntimeError):
        with packed.Appender(tmp_path / "b.npy", width=1) as appender:
            appender.append(np.ones((5, 1), np.float32))
            raise RuntimeError("stop")
    with pytest.raises(ValueError):
        np.load(tmp_path / "b.npy", allow_pickle=False)  # zero header: never taken for an array

