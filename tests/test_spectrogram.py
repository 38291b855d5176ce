"""spectrogram: params validation, log-mel values vs librosa, the stage end to end."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from audiocnn import config, data, fileio, images, normalize, packed, spectrogram
from audiocnn.audio import AudioParams
from audiocnn.config import ParamsError
from audiocnn.errors import DataError
from audiocnn.spectrogram import SpectrogramParams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _feature_cache_in_tmp(tmp_path, monkeypatch):
    """Stage runs here use a throwaway feature cache, never the repo's .cache/audiocnn."""
    monkeypatch.setenv("AUDIOCNN_CACHE_DIR", str(tmp_path / "feature-cache"))


def spec_params(**overrides) -> SpectrogramParams:
    section = {**config.read_params(REPO / "params.yaml")["spectrogram"], "workers": 1, **overrides}
    return config.load_section({"spectrogram": section}, "spectrogram", SpectrogramParams)


def test_n_mels_message_exact():
    with pytest.raises(ParamsError) as err:
        spec_params(n_fft=512, n_mels=512)
    assert str(err.value) == "spectrogram.n_mels=512 exceeds n_fft/2+1=257"


@pytest.mark.parametrize("overrides, message", [
    ({"hop_length": 1024}, r"^spectrogram\.hop_length=1024 must be in 1\.\.n_fft=512"),
    ({"fmin": 500.0, "fmax": 400.0}, r"^spectrogram\.fmax=400\.0 must be above fmin=500\.0"),
    ({"fmin": -1.0}, r"^spectrogram\.fmin=-1\.0 must be >= 0"),
    ({"top_db": 0.0}, r"^spectrogram\.top_db=0\.0 must be > 0"),
    ({"preemphasis": 1.0}, r"^spectrogram\.preemphasis=1\.0 must be in \[0, 1\)"),
    ({"preemphasis": -0.5}, r"^spectrogram\.preemphasis=-0\.5 must be in \[0, 1\)"),
    ({"image_size": 0}, r"^spectrogram\.image_size=0 must be > 0"),
    ({"gallery_per_class": 0}, r"^spectrogram\.gallery_per_class=0 must be > 0"),
    ({"workers": -1}, r"^spectrogram\.workers=-1 must be >= 0"),
])
def test_params_validation(overrides, message):
    with pytest.raises(ParamsError, match=message):
        spec_params(**overrides)


def test_fmax_checked_against_sample_rate_naming_both_keys():
    spectrogram.check_against_audio(spec_params(fmax=8000.0), AudioParams(16000))
    with pytest.raises(ParamsError, match=r"spectrogram\.fmax=9000 exceeds audio\.sample_rate/2=8000"):
        spectrogram.check_against_audio(spec_params(fmax=9000.0), AudioParams(16000))


def test_log_mel_matches_librosa():
    params = spec_params()
    x = (0.1 * np.random.default_rng(0).standard_normal(12345)).astype(np.float32)
    db = spectrogram.log_mel(x, 16000, params)
    frames = 1 + 12345 // params.hop_length  # librosa's centred frames
    assert db.dtype == np.float32 and db.shape == (frames + 1, params.n_mels)  # + 1 that overlaps the clip's end
    assert db.shape[0] == spectrogram.expected_frames(12345, params)  # 12345 + 256 samples reach into frame 78
    mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=params.n_fft, hop_length=params.hop_length,
                                         n_mels=params.n_mels, fmin=params.fmin, fmax=params.fmax, center=True)
    np.testing.assert_allclose(db[:frames], librosa.power_to_db(mel, ref=1.0, top_db=params.top_db).T, atol=1e-3)
    assert db.max() - db.min() <= params.top_db + 1e-4


def test_top_db_floor_and_filterbank_cache():
    params = spec_params(top_db=30.0)
    x = np.zeros(4000, np.float32)
    x[2000] = 1.0  # a click: most of the spectrogram is far below its peak
    db = spectrogram.log_mel(x, 16000, params)
    assert db.min() == pytest.approx(db.max() - 30.0)
    basis = spectrogram.mel_basis(16000, params.n_fft, params.n_mels, params.fmin, params.fmax)
    assert basis is spectrogram.mel_basis(16000, params.n_fft, params.n_mels, params.fmin, params.fmax)


def make_normalized(tmp_path: Path) -> Path:
    """A normalize output: 2 classes x 3 clips of tones, index.csv with the contract columns."""
    root = tmp_path / "normalize"
    rows, clips = [], {}
    for label, freq in (("low tone", 300.0), ("High/Tone", 3000.0)):
        for k in range(3):
            clip_id = f"{label[:3].lower()}-{k}"
            t = np.arange(4000 + 800 * k) / 16000
            clips[clip_id] = (0.1 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[:, np.newaxis]  # (samples, 1)
            rows.append({"id": clip_id, "path": f"{clip_id}.wav", "label": label, "group": "", "fold": ""})
    packed.write(root, clips, pd.DataFrame(rows), kind=packed.AUDIO)
    index = fileio.read_csv(root / "index.csv")
    index["clip_sha256"] = [normalize.clip_sha256(clips[i]) for i in index["id"]]
    fileio.write_csv(root / "index.csv", index)
    return root


def run_stage(tmp_path: Path, name: str, cache="env", **overrides) -> Path:
    out = tmp_path / name
    spectrogram.run(tmp_path / "normalize", out / "features", out / "images", out / "gallery.png",
                    AudioParams(16000), spec_params(**{"images": True, "image_size": 32, **overrides}), cache=cache)
    return out


def test_run_outputs_and_workers_identical(tmp_path):
    make_normalized(tmp_path)
    one = run_stage(tmp_path, "one")  # computed in-process, stored in the cache
    two = run_stage(tmp_path, "two", cache=None, workers=2)  # computed by two workers
    three = run_stage(tmp_path, "three", workers=2)  # every clip from the cache
    index = fileio.read_csv(one / "features" / "index.csv")
    assert list(index.columns) == ["id", "path", "label", "group", "fold", "samples", "clip_sha256", "frames", "offset",
                                   "image"]
    assert index["frames"].astype(int).tolist() == [1 + (int(s) + 255) // 160 for s in index["samples"]]  # frames overlapping the clip
    assert index["offset"].astype(int).tolist() == [0, *np.cumsum(index["frames"].astype(int))[:-1]]
    assert fileio.read_json(one / "features" / "meta.json") == {
        "sample_rate": 16000, "n_fft": 512, "hop_length": 160, "n_mels": 64, "fmin": 20.0, "fmax": 8000.0,
        "top_db": 80.0, "preemphasis": 0.0}
    assert sorted(p.name for p in (one / "features").iterdir()) == ["features.npy", "index.csv", "meta.json"]
    array = fileio.load_npy(one / "features" / "features.npy")
    assert array.shape == (index["frames"].astype(int).sum(), 64) and array.dtype == np.float32
    for out in (two, three):
        assert (out / "features" / "features.npy").read_bytes() == (one / "features" / "features.npy").read_bytes()
        assert fileio.read_csv(out / "features" / "index.csv").equals(index)
    for row in index.itertuples():
        clip = normalize.read_clip(normalize.open_clips(tmp_path / "normalize"), row.id)
        expected, _ = spectrogram.features_of(clip, 16000, spec_params(image_size=32), image=False)
        np.testing.assert_allclose(data.load_features(one / "features", row.id), expected, atol=1e-4)  # BLAS threads
        assert row.image.endswith(f"/{row.id}.png") and "/" not in row.image.split("/")[0]
        with Image.open(one / "images" / row.image) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
        for out in (two, three):
            assert (one / "images" / row.image).read_bytes() == (out / "images" / row.image).read_bytes()
    assert len({p.parent for p in (one / "images").rglob("*.png")}) == 2
    with Image.open(one / "gallery.png") as gallery:
        assert gallery.size[0] > 300


@pytest.mark.parametrize("row, change, error", [
    (2, {"samples": 1000}, r"clips\.npy \(clip low-2\): content changed since normalize wrote it"),
    (1, {"offset": 1}, r"clips\.npy \(clip low-1\): content changed since normalize wrote it"),
    (5, {"samples": 1}, r"index\.csv: clip hig-2 has rows \d+\+5601 outside .*clips\.npy"),
])
def test_run_rejects_an_index_that_disagrees_with_the_clips(tmp_path, row, change, error):
    """normalize's index.csv edited by hand: the clip's rows no longer hold what clip_sha256 says, or lie outside."""
    make_normalized(tmp_path)
    index_path = tmp_path / "normalize" / "index.csv"
    index = fileio.read_csv(index_path)
    for column, delta in change.items():
        index.loc[row, column] = str(int(index.loc[row, column]) + delta)
    fileio.write_csv(index_path, index)
    with pytest.raises(DataError, match=error):
        run_stage(tmp_path, "bad", cache=None)
    assert not (tmp_path / "bad" / "features").exists()


def test_run_without_images(tmp_path):
    make_normalized(tmp_path)
    out = run_stage(tmp_path, "noimg", images=False)
    assert (out / "images").is_dir() and not any((out / "images").iterdir())
    assert set(fileio.read_csv(out / "features" / "index.csv")["image"]) == {""}
    assert (out / "gallery.png").is_file()


def test_gallery_takes_first_ids_per_class(tmp_path, monkeypatch):
    make_normalized(tmp_path)
    seen = []
    monkeypatch.setattr(spectrogram.images, "gallery_png", lambda panels, *a: seen.extend(panels) or b"png")
    run_stage(tmp_path, "g", gallery_per_class=2, images=False)
    assert [(label, clip_id) for label, clip_id, _ in seen] == [
        ("High/Tone", "hig-0"), ("High/Tone", "hig-1"), ("low tone", "low-0"), ("low tone", "low-1")]


def test_stage_script_rejects_fmax_above_nyquist(tmp_path):
    make_normalized(tmp_path)
    params = config.read_params(REPO / "params.yaml")
    params["spectrogram"]["fmax"] = 12000.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main = runpy.run_path(str(REPO / "stages" / "spectrogram.py"))["main"]
    with pytest.raises(ParamsError, match=r"spectrogram\.fmax=12000 exceeds audio\.sample_rate/2"):
        main(["--params", str(tmp_path / "params.yaml"), "--normalized", str(tmp_path / "normalize"),
              "--features", str(tmp_path / "f"), "--images", str(tmp_path / "i"), "--gallery", str(tmp_path / "g.png")])


def test_normalize_stage_imports_no_pandas(tmp_path):
    """normalize reads its manifest and writes its index as columns: pandas' import alone is ~0.5 s."""
    from test_store import make_manifest

    source, manifest = make_manifest(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.read_params(REPO / "params.yaml")))
    script = (f"import runpy, sys; main = runpy.run_path({str(REPO / 'stages' / 'normalize.py')!r})['main']; "
              "main(sys.argv[1:]); print(sorted({'pandas'} & set(sys.modules)))")
    args = ["--params", str(tmp_path / "params.yaml"), "--source", str(source), "--manifest", str(manifest),
            "--out", str(tmp_path / "n")]
    env = {**os.environ, "AUDIOCNN_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]"
    index = fileio.read_csv(tmp_path / "n" / "index.csv")
    assert index.columns[-3:].tolist() == ["offset", "samples", "clip_sha256"] and index.shape[0] == 4


def test_stage_imports_neither_pandas_nor_matplotlib(tmp_path):
    """After adding clips the stage's own work is a fraction of a second: pandas' import alone is ~0.5 s,
    matplotlib's 0.35 s (the gallery is drawn with PIL)."""
    make_normalized(tmp_path)
    params = config.read_params(REPO / "params.yaml")
    params["spectrogram"].update(images=False, gallery_per_class=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = (f"import runpy, sys; main = runpy.run_path({str(REPO / 'stages' / 'spectrogram.py')!r})['main']; "
              "main(sys.argv[1:]); print(sorted({'pandas', 'matplotlib'} & set(sys.modules)))")
    args = ["--params", str(tmp_path / "params.yaml"), "--normalized", str(tmp_path / "normalize"),
            "--features", str(tmp_path / "f"), "--images", str(tmp_path / "i"), "--gallery", str(tmp_path / "g.png")]
    env = {**os.environ, "AUDIOCNN_CACHE_DIR": str(tmp_path / "cache")}
    cold = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    assert cold.stdout.strip().splitlines()[-1] == "[]"
    assert images.is_complete_png((tmp_path / "g.png").read_bytes())  # the gallery was drawn
    (tmp_path / "g.png").unlink()
    warm = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    assert warm.stdout.strip().splitlines()[-1] == "[]"
    assert images.is_complete_png((tmp_path / "g.png").read_bytes())  # from the cache
    assert fileio.read_csv(tmp_path / "f" / "index.csv").shape[0] == 6


@pytest.mark.parametrize("rate, n_fft, n_mels, fmin, fmax", [(16000, 512, 64, 20.0, 8000.0), (8000, 256, 40, 0.0, 4000.0),
                                                             (22050, 2048, 128, 300.0, 11025.0)])
def test_mel_basis_equals_librosa(rate, n_fft, n_mels, fmin, fmax):
    ours = spectrogram.mel_basis(rate, n_fft, n_mels, fmin, fmax)
    theirs = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(spectrogram.mel_frequencies(n_mels, fmin, fmax),
                               librosa.mel_frequencies(n_mels, fmin=fmin, fmax=fmax), rtol=1e-12)


def test_preemphasis_equals_filtering_the_waveform():
    """spectrogram.preemphasis weights the filterbank by the high-pass's power gain: the same dB as
    applying y[n] - a * y[n-1] to the waveform (librosa.effects.preemphasis) before the STFT, away from
    the floor; the lows lose and the highs gain against the default."""
    plain, emphasized = spec_params(top_db=120.0), spec_params(top_db=120.0, preemphasis=0.97)
    basis = spectrogram.mel_basis(16000, plain.n_fft, plain.n_mels, plain.fmin, plain.fmax)
    gain = 1 - 2 * 0.97 * np.cos(2 * np.pi * np.fft.rfftfreq(plain.n_fft, 1 / 16000) / 16000) + 0.97**2  # (bins,)
    np.testing.assert_allclose(spectrogram.mel_basis(16000, plain.n_fft, plain.n_mels, plain.fmin, plain.fmax, 0.97),
                               basis * gain, rtol=1e-5)
    x = (0.1 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32)  # white: every band above the floor
    ours = spectrogram.log_mel(x, 16000, emphasized)
    filtered = librosa.effects.preemphasis(x, coef=0.97, zi=[0.0]).astype(np.float32)
    reference = spectrogram.log_mel(filtered, 16000, plain)
    inner = slice(2, -2)  # frames that hold only the clip (the padded edges differ by the filter's start)
    assert np.median(np.abs(ours[inner] - reference[inner])) < 0.2  # dB
    shift = (ours - spectrogram.log_mel(x, 16000, plain))[inner].mean(axis=0)  # (n_mels,) dB
    assert shift[0] < -15 and shift[-1] > 5  # measured: -28 dB in the lowest band (66 Hz), +5.9 dB in the highest (7.6 kHz)


@pytest.mark.parametrize("n_fft, hop, samples", [(256, 80, 3001), (255, 64, 1000), (512, 160, 100)])
def test_log_mel_matches_librosa_for_other_sizes(n_fft, hop, samples):
    params = spec_params(n_fft=n_fft, hop_length=hop, n_mels=40)
    x = (0.3 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    db = spectrogram.log_mel(x, 16000, params)
    mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=n_fft, hop_length=hop, n_mels=40, fmin=params.fmin,
                                         fmax=params.fmax, center=True, pad_mode="constant")
    expected = librosa.power_to_db(mel, ref=1.0, top_db=params.top_db).T
    assert expected.shape == (1 + samples // hop, 40) and db.shape == (spectrogram.expected_frames(samples, params), 40)
    np.testing.assert_allclose(db[: len(expected)], expected, atol=1e-3)
    padded = np.concatenate([x, np.zeros(n_fft, np.float32)])  # the frames after librosa's: the clip's tail
    np.testing.assert_allclose(db[len(expected) :], spectrogram.log_mel(padded, 16000, params)[len(expected) : len(db)],
                               atol=1e-3)
