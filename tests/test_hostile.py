"""Hostile and odd input through the whole data pipeline (ingest -> normalize -> spectrogram -> split).

Every case is either accepted and processed correctly (checked on the normalized audio and the
features), or rejected with a reason in rejected.csv; never a traceback, never a silent drop,
never a change to the source folder.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import runpy
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from audiocnn import audio, data, fileio, ingest, normalize, split, stage
from audiocnn.errors import DataError
from conftest import REPO, real_params
from test_ingest import make_params, snapshot

STAGES = {name: runpy.run_path(str(REPO / "stages" / f"{name}.py"))["main"]
          for name in ("ingest", "normalize", "spectrogram", "split")}
SR = 16000  # audio.sample_rate of the pipeline
TONE_HZ = 1000.0


def pipeline_params(source: Path, **ingest) -> dict:
    """The real params pointed at ``source``, one worker, small images."""
    params = real_params()
    params["ingest"].update(source=str(source), max_reject_fraction=1.0, **ingest)
    params["normalize"]["workers"] = 1
    params["spectrogram"].update(workers=1, images=True, image_size=32, gallery_per_class=1)
    params["split"].update(val_size=0.25, test_size=0.25)
    return params


def run_pipeline(source: Path, out: Path, params: dict, until: str = "split") -> Path:
    """Run the stage scripts' main() in order, as dvc.yaml calls them, into ``out``."""
    params_file = out / "params.yaml"
    out.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    ds = out / "dataset"
    argvs = {
        "ingest": ["--source", str(source), "--manifest", f"{ds}/ingest/manifest.csv",
                   "--rejected", f"{ds}/ingest/rejected.csv", "--metrics", f"{out}/metrics/ingest.json"],
        "normalize": ["--source", str(source), "--manifest", f"{ds}/ingest/manifest.csv", "--out", f"{ds}/normalize"],
        "spectrogram": ["--normalized", f"{ds}/normalize", "--features", f"{ds}/features",
                        "--images", f"{ds}/spectrograms", "--gallery", f"{out}/reports/gallery.png"],
        "split": ["--features", f"{ds}/features", "--out", f"{ds}/split", "--metrics", f"{out}/metrics/split.json"],
    }
    for name, argv in argvs.items():
        STAGES[name](["--params", str(params_file), *argv])
        if name == until:
            break
    return ds


def tone(seconds: float, rate: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    """(frames, channels) float64 sine at TONE_HZ, the same in every channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.repeat((amp * np.sin(2 * np.pi * TONE_HZ * t))[:, None], channels, axis=1)


def write(path: Path, data: np.ndarray, rate: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{abs(hash(path.name))}.{kwargs.get('format', 'WAV').lower()}"
    sf.write(tmp, data, rate, **kwargs)
    tmp.rename(path)  # names (and extensions) soundfile would not pick itself
    return path


# --- formats: every depth, rate and channel count is decoded, mixed down, resampled, levelled -----------

FORMATS = [  # (subtype, format, rate, channels)
    ("PCM_U8", "WAV", 8000, 1), ("PCM_S8", "FLAC", 11025, 2), ("PCM_16", "WAV", 22050, 3),
    ("PCM_24", "WAV", 44100, 4), ("PCM_32", "WAV", 48000, 6), ("FLOAT", "WAV", 96000, 8),
    ("DOUBLE", "WAV", 192000, 2), ("PCM_24", "FLAC", 192000, 1), ("VORBIS", "OGG", 32000, 2),
]


def test_every_depth_rate_and_channel_count_goes_through(tmp_path):
    source = tmp_path / "src"
    for i, (subtype, fmt, rate, channels) in enumerate(FORMATS):
        for label in ("a", "b", "c"):  # 3 copies per format: every class can be split 3 ways
            seconds = 0.5 + 0.01 * i + 0.001 * "abc".index(label)  # distinct bytes: no duplicates
            write(source / label / f"{subtype}-{rate}-{channels}ch.{fmt.lower()}", tone(seconds, rate, channels),
                  rate, subtype=subtype, format=fmt)
    before = snapshot(source)
    ds = run_pipeline(source, tmp_path / "out", pipeline_params(source))
    manifest = fileio.read_csv(ds / "ingest" / "manifest.csv")
    assert fileio.read_csv(ds / "ingest" / "rejected.csv").empty and len(manifest) == 3 * len(FORMATS)
    index = fileio.read_csv(ds / "normalize" / "index.csv").set_index("path")
    clips = normalize.open_clips(ds / "normalize")
    for subtype, fmt, rate, channels in FORMATS:
        row = index.loc[f"a/{subtype}-{rate}-{channels}ch.{fmt.lower()}"]
        assert (int(row.sample_rate), int(row.channels)) == (rate, channels)
        mono = normalize.read_clip(clips, row.id)  # (samples,) float32 at SR
        assert mono.dtype == np.float32 and mono.ndim == 1 and np.isfinite(mono).all()
        assert abs(len(mono) - float(row.duration) * SR) <= 2, subtype
        rms_dbfs = 20 * math.log10(float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))))
        assert rms_dbfs == pytest.approx(-20.0, abs=0.2), subtype  # normalize.target_dbfs, method rms
        spectrum = np.abs(np.fft.rfft(mono))
        assert np.argmax(spectrum) * SR / len(mono) == pytest.approx(TONE_HZ, abs=5), subtype
        features = data.load_features(ds / "features", row.id)  # (frames, n_mels) dB
        assert features.shape == (1 + (len(mono) + 255) // 160, 64) and np.isfinite(features).all()  # frames overlapping it
    split = {name: fileio.read_csv(ds / "split" / f"{name}.csv") for name in ("train", "val", "test")}
    assert sum(len(f) for f in split.values()) == len(manifest)
    assert snapshot(source) == before


# --- odd content: rejected with a reason, or kept and made sane ------------------------------------------


def odd_source(root: Path) -> Path:
    """Good clips in 3 classes plus every kind of odd file."""
    source = root / "src"
    for label in ("a", "b", "c"):
        for i in range(3):
            write(source / label / f"good{i}.wav", tone(0.4 + 0.01 * i, 8000) * (1 + "abc".index(label)) / 4, 8000)
    clipped = np.clip(tone(0.5, 8000, amp=4.0), -1.0, 1.0)  # full-scale square-ish wave
    write(source / "a" / "clipped.wav", clipped, 8000, subtype="PCM_16")
    write(source / "a" / "clipped-float.wav", clipped, 8000, subtype="FLOAT")
    write(source / "b" / "flac-named.wav", tone(0.45, 8000), 8000, format="FLAC")  # wrong extension, real audio
    write(source / "b" / "wav-named.flac", tone(0.46, 8000), 8000)
    write(source / "c" / "tiny.wav", tone(0.3, 8000) * 1e-4, 8000, subtype="PCM_16")  # a few LSBs: quiet, kept
    full = write(root / "full.wav", tone(1.0, 8000), 8000, subtype="PCM_16").read_bytes()
    (source / "c" / "truncated-data.wav").write_bytes(full[: len(full) // 2])  # header says 1 s, half is there
    bad = source / "bad"
    (bad / "sub").mkdir(parents=True)
    (bad / "zero-bytes.wav").write_bytes(b"")
    (bad / "truncated-header.wav").write_bytes(full[:30])
    (bad / "text.wav").write_text("hello, not audio")
    write(bad / "one-sample.wav", np.array([[0.5]]), 8000)
    write(bad / "silence.wav", np.zeros((4000, 1)), 8000, subtype="PCM_16")
    write(bad / "silence-float.flac", np.zeros((4000, 2)), 8000, format="FLAC")
    for name, value in (("nan", np.nan), ("inf", np.inf), ("minus-inf", -np.inf)):
        data = tone(0.5, 8000).astype(np.float32)
        data[100] = value
        write(bad / f"{name}.wav", data, 8000, subtype="FLOAT")
    (bad / "sub" / "notes.txt").write_text("not a candidate: no audio extension")
    return source


def test_odd_files_are_rejected_with_a_reason_or_processed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = odd_source(tmp_path)
    before = snapshot(source)
    ds = run_pipeline(source, tmp_path / "out", pipeline_params(source))
    rejected = dict(zip(*fileio.read_csv(ds / "ingest" / "rejected.csv")[["path", "reason"]].T.values))
    assert {p: r.partition(":")[0] for p, r in rejected.items()} == {
        "bad/zero-bytes.wav": "unreadable", "bad/truncated-header.wav": "unreadable", "bad/text.wav": "unreadable",
        "bad/one-sample.wav": "too_short", "bad/silence.wav": "silent", "bad/silence-float.flac": "silent",
        "bad/nan.wav": "non_finite", "bad/inf.wav": "non_finite", "bad/minus-inf.wav": "non_finite",
    }
    manifest = fileio.read_csv(ds / "ingest" / "manifest.csv").set_index("path")
    candidates = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.suffix in (".wav", ".flac")}
    assert set(manifest.index) | set(rejected) == candidates  # nothing dropped silently
    assert float(manifest.loc["c/truncated-data.wav", "duration"]) == pytest.approx(0.5, abs=0.01)  # what is there
    assert "ignored 1 file(s) without an audio extension" in caplog.text  # notes.txt: counted, not silent
    index = fileio.read_csv(ds / "normalize" / "index.csv").set_index("path")
    for path in ("a/clipped.wav", "a/clipped-float.wav", "c/tiny.wav", "b/flac-named.wav", "b/wav-named.flac",
                 "c/truncated-data.wav"):
        mono = normalize.read_clip(normalize.open_clips(ds / "normalize"), index.loc[path, "id"])
        assert np.isfinite(mono).all() and 0 < np.abs(mono).max() <= 1.0, path
    clipped = normalize.read_clip(normalize.open_clips(ds / "normalize"), index.loc["a/clipped.wav", "id"])
    assert 20 * math.log10(np.abs(clipped).max()) <= -0.1 + 1e-3  # rms gain limited below full scale
    features = fileio.read_csv(ds / "features" / "index.csv")
    assert len(features) == len(manifest) and (features["frames"].astype(int) > 0).all()
    assert snapshot(source) == before


def test_single_sample_clip_is_processed_when_min_duration_allows(tmp_path):
    source = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(3):
            write(source / label / f"{i}.wav", np.array([[0.1 * (i + 1) + 0.4 * (label == "b")]]), 8000,
                  subtype="FLOAT")
    ds = run_pipeline(source, tmp_path / "out", pipeline_params(source, min_duration=0.0))
    index = fileio.read_csv(ds / "features" / "index.csv")
    assert len(index) == 6 and set(index["frames"]) == {"2"}  # 2 samples at 16 kHz: 1 + (2 + 255) // 160 frames
    for clip_id in index["id"]:
        x = data.load_features(ds / "features", clip_id)
        assert x.shape == (2, 64) and np.isfinite(x).all()
    assert len(fileio.read_csv(ds / "split" / "train.csv")) == 2


# --- names ------------------------------------------------------------------------------------------------

HOSTILE_CLASSES = ["-rf class", "ünï cødé 音", 'quo"te', "com,ma", "it's", "sp ace"]
HOSTILE_FILES = ["-x.wav", "a, b.wav", 'say "hi".wav', "ñ €.WAV", " lead space.wav", "--help.wav"]


def test_hostile_names_through_the_pipeline(tmp_path):
    source = tmp_path / "src"
    for c, label in enumerate(HOSTILE_CLASSES):
        for f, name in enumerate(HOSTILE_FILES[:4] if c % 2 else HOSTILE_FILES[2:]):
            write(source / label / name, tone(0.3 + 0.01 * f, 8000) * (0.2 + 0.1 * c), 8000)
    before = snapshot(source)
    ds = run_pipeline(source, tmp_path / "out", pipeline_params(source))
    index = fileio.read_csv(ds / "features" / "index.csv")
    assert sorted(set(index["label"])) == sorted(HOSTILE_CLASSES) and len(index) == 4 * len(HOSTILE_CLASSES)
    assert all((source / p).is_file() for p in index["path"])
    for row in index.itertuples():
        assert (ds / "spectrograms" / row.image).is_file() and data.load_features(ds / "features", row.id).size
    split = [fileio.read_csv(ds / "split" / f"{name}.csv") for name in ("train", "val", "test")]
    assert all(set(part["label"]) == set(HOSTILE_CLASSES) for part in split)
    assert snapshot(source) == before


def test_csv_layout_with_escaping_paths_through_the_pipeline(tmp_path):
    source = tmp_path / "src"
    secret = write(tmp_path / "secret.wav", tone(0.5, 8000), 8000)
    for label in ("x", "y"):
        for i in range(3):
            write(source / "audio" / f"{label}{i}.wav", tone(0.3 + 0.01 * i, 8000) * (0.3 + 0.3 * (label == "y")), 8000)
    os.symlink(secret, source / "audio" / "link.wav")
    os.symlink("loop.wav", source / "audio" / "loop.wav")
    rows = [f"./audio//{label}{i}.wav,{label}" for label in ("x", "y") for i in range(3)]
    rows += ["../secret.wav,x", "../../../../../etc/passwd,x", f"{secret},y", "audio/link.wav,x", "audio/loop.wav,y"]
    (source / "meta.csv").write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    before = snapshot(source)
    ds = run_pipeline(source, tmp_path / "out", pipeline_params(source, layout="csv", csv="meta.csv"))
    rejected = fileio.read_csv(ds / "ingest" / "rejected.csv")
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert len(reasons) == 5 and all(r.startswith(("outside_source", "unreadable")) for r in reasons.values())
    assert reasons["audio/link.wav"].startswith("outside_source") and reasons["../secret.wav"].startswith("outside")
    index = fileio.read_csv(ds / "features" / "index.csv")
    assert sorted(index["path"]) == sorted(f"audio/{label}{i}.wav" for label in ("x", "y") for i in range(3))
    assert snapshot(source) == before


# --- sizes: empty, one clip in a class, thousands of classes, hours of audio --------------------------


def test_empty_source_and_a_one_clip_class_fail_clearly(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_pipeline_stage(empty, tmp_path / "out-empty", "ingest")
    assert exit_.value.code == 2 and "no candidates found" in caplog.text and str(empty) in caplog.text
    source = tmp_path / "src"
    for label, count in (("a", 3), ("b", 3), ("lonely", 1)):
        for i in range(count):
            write(source / label / f"{i}.wav", tone(0.3 + 0.01 * i, 8000) * (0.2 + 0.2 * len(label) / 6), 8000)
    caplog.clear()
    with pytest.raises(SystemExit) as exit_:
        run_pipeline_stage(source, tmp_path / "out", "split")
    assert exit_.value.code == 2
    assert "class 'lonely' has 1 clip(s): too few to split" in caplog.text and "Traceback" not in caplog.text


def run_pipeline_stage(source: Path, out: Path, until: str) -> Path:
    """run_pipeline through ``stage.run`` (as ``python stages/x.py`` does): errors become exit 2 + one line."""
    params = pipeline_params(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return stage.run(lambda argv: run_pipeline(source, out, params, until), [])


def test_a_stage_process_freezes_its_heap_before_exiting_and_a_caller_keeps_its_own():
    """``stage.run`` without argv (the script's process): the exit's last collection skips what is left."""
    code = "import gc\nfrom audiocnn import stage\nstage.run(lambda argv: None)\nprint(gc.get_freeze_count() > 0)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
    frozen = gc.get_freeze_count()
    stage.run(lambda argv: None, [])  # called with argv (as tests do): this process goes on, nothing is frozen
    assert gc.get_freeze_count() == frozen


def test_two_thousand_classes_ingest_then_split_explains(tmp_path):
    source = tmp_path / "src"
    header = None
    for i in range(2000):  # 2000 classes x 1 clip of 0.15 s; distinct bytes
        path = source / f"class {i:04d}" / "clip.wav"
        path.parent.mkdir(parents=True)
        if header is None:
            write(path, tone(0.15, 8000), 8000, subtype="PCM_16")
            header = path.read_bytes()
        else:
            data = bytearray(header)
            data[-4:] = i.to_bytes(4, "little")  # last 2 samples differ
            path.write_bytes(bytes(data))
    params = pipeline_params(source)
    ds = run_pipeline(source, tmp_path / "out", params, until="ingest")
    metrics = fileio.read_json(tmp_path / "out" / "metrics" / "ingest.json")
    assert metrics["clips"] == 2000 and metrics["classes"] == 2000 and metrics["rejected"] == 0
    index = fileio.read_csv(ds / "ingest" / "manifest.csv")
    index["frames"] = "25"
    (ds / "features").mkdir(parents=True)
    fileio.write_csv(ds / "features" / "index.csv", index)
    split_params = split.SplitParams(strategy="stratified", val_size=0.15, test_size=0.15, test_folds=(),
                                     val_folds=(), seed=0)
    with pytest.raises(DataError, match=r"class 'class 0000' has 1 clip\(s\): too few to split, needs at least 3"):
        split.run(ds / "features", ds / "split", tmp_path / "split.json", split_params)


def test_hours_long_file_is_kept_and_normalize_reads_only_max_duration(tmp_path, monkeypatch):
    rate, hours = 8000, 1.0
    path = tmp_path / "src" / "long" / "hour.wav"
    path.parent.mkdir(parents=True)
    block = (tone(10.0, rate) * 0.5 * 255).astype(np.int16)  # 10 s of tone
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_U8") as snd:  # 1 h, 29 MB, written in blocks
        for _ in range(int(hours * 360)):
            snd.write(block)
    result = ingest.ingest(tmp_path / "src", make_params(tmp_path / "src", max_duration=5.0))
    assert result.manifest["duration"].tolist() == [pytest.approx(3600.0)]

    frames_read = []
    real_read = sf.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        out = real_read(self, frames, *args, **kwargs)
        frames_read.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    tracemalloc.start()
    record = {"id": "hour", "path": "long/hour.wav"}
    params = normalize.NormalizeParams(method="rms", target_dbfs=-20.0, trim_db=0.0, workers=1)
    mono = normalize.normalized_audio(record, tmp_path / "src", SR, params, max_seconds=5.0)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(frames_read) == 5 * rate  # 5 s of 3600 s decoded
    assert mono.shape == (5 * SR,) and peak_bytes < 20 * 2**20  # far below the 3600 s (115 MB as float32)
    assert audio.scan(path).frames == 3600 * rate



def test_read_mono_holds_only_the_mix(tmp_path):
    rate, channels, seconds = 48000, 8, 30
    path = tmp_path / "wide.wav"
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as snd:  # 23 MB on disk, written in blocks
        for i in range(seconds):
            snd.write(np.random.default_rng(i).uniform(-0.5, 0.5, (rate, channels)))
    tracemalloc.start()
    mono, got_rate = audio.read_mono(path, max_seconds=20.0)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got_rate == rate and mono.shape == (20 * rate,) and mono.dtype == np.float32
    assert peak_bytes < 2.5 * mono.nbytes  # all 8 channels as float32 would be 8x the mix
    full, _ = audio.read_audio(path, max_seconds=20.0)  # (frames, 8) float32
    assert np.array_equal(mono, normalize.to_mono(full))  # the same numbers as the normalize stage's downmix
