"""Decoding helpers: every format and sample type ingest accepts, streaming in blocks, clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from audiocnn import audio
from audiocnn.config import ParamsError, load_section

SR = 8000


def tone(seconds: float = 0.5, channels: int = 1, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    """A different sine per channel: (frames, channels) float64 within +-amp."""
    t = np.arange(int(seconds * sr)) / sr
    return np.stack([amp * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)


def write_or_skip(path, data, sr, **kwargs) -> None:
    try:
        sf.write(path, data, sr, **kwargs)
    except (sf.LibsndfileError, TypeError, ValueError) as err:  # e.g. libsndfile built without lame
        pytest.skip(f"soundfile cannot write {path.name} here: {err}")


def test_audio_params_validated():
    assert load_section({"audio": {"sample_rate": 16000}}, "audio", audio.AudioParams).sample_rate == 16000
    with pytest.raises(ParamsError, match="audio.sample_rate"):
        load_section({"audio": {"sample_rate": 100}}, "audio", audio.AudioParams)


@pytest.mark.parametrize(
    "fmt, subtype, tolerance",
    [
        ("WAV", "PCM_U8", 1 / 64),
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "PCM_24", 1e-6),
        ("WAV", "PCM_32", 1e-6),
        ("WAV", "FLOAT", 1e-7),
        ("WAV", "DOUBLE", 1e-7),
        ("FLAC", "PCM_S8", 1 / 64),
        ("FLAC", "PCM_16", 1e-4),
        ("FLAC", "PCM_24", 1e-6),
    ],
)
def test_pcm_types_decode_to_float32_full_scale(tmp_path, fmt, subtype, tolerance):
    data = tone(0.25, channels=2)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, data, SR, format=fmt, subtype=subtype)
    samples, sr = audio.read_audio(path)
    assert sr == SR and samples.dtype == np.float32 and samples.shape == data.shape
    np.testing.assert_allclose(samples, data, atol=tolerance)
    info = audio.probe(path)
    assert (info.format, info.subtype, info.channels, info.frames) == (fmt, subtype, 2, len(data))


@pytest.mark.parametrize("ext, fmt, subtype", [("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")])
def test_lossy_formats_decode(tmp_path, ext, fmt, subtype):
    data = tone(1.0, sr=16000)
    path = tmp_path / f"x.{ext}"
    write_or_skip(path, data, 16000, format=fmt, subtype=subtype)
    scan = audio.scan(path)
    assert scan.sample_rate == 16000 and scan.channels == 1
    assert abs(scan.frames - 16000) <= 16000 * 0.02  # encoder delay/padding at most a few ms
    assert 0.3 < scan.peak < 0.8 and scan.non_finite == 0


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 8])
def test_any_channel_count(tmp_path, channels):
    path = tmp_path / "multi.wav"
    sf.write(path, tone(0.1, channels), SR, subtype="PCM_16")
    samples, _ = audio.read_audio(path)
    assert samples.shape == (800, channels)
    assert audio.scan(path).channels == channels


def test_read_audio_stops_at_max_seconds(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, tone(3.0), SR)
    samples, sr = audio.read_audio(path, max_seconds=1.25)
    assert samples.shape == (10000, 1) and sr == SR
    assert audio.read_audio(path, max_seconds=float("inf"))[0].shape == (24000, 1)


def test_blocks_bound_memory_and_cover_the_file(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(20.0, channels=2), SR, subtype="PCM_16")  # 160000 frames
    sizes = [block.shape for block, sr in audio.iter_blocks(path, block_frames=4096)]
    assert all(rows <= 4096 and cols == 2 for rows, cols in sizes)
    assert sum(rows for rows, _ in sizes) == 160000
    assert sum(b.shape[0] for b, _ in audio.iter_blocks(path, 4096, max_frames=5000)) == 5000
    scan = audio.scan(path, block_frames=4096)
    assert scan.frames == 160000 and scan.duration_s == pytest.approx(20.0)


def test_scan_counts_non_finite_and_peak(tmp_path):
    data = np.zeros((1000, 2), dtype=np.float32)
    data[10, 0], data[20, 1], data[30, 0] = np.nan, np.inf, -0.75
    path = tmp_path / "bad.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    scan = audio.scan(path, block_frames=64)
    assert scan.non_finite == 2 and scan.peak == pytest.approx(0.75)
    sf.write(path, np.zeros(1000), SR, subtype="PCM_16")
    assert audio.scan(path).peak == 0.0


@pytest.mark.parametrize("content", [b"", b"hello, not audio at all", b"RIFF\x00\x00\x00\x00WAVEjunk"])
def test_undecodable_bytes_raise_audio_read_error(tmp_path, content):
    path = tmp_path / "fake.wav"
    path.write_bytes(content)
    with pytest.raises(audio.AudioReadError, match="fake.wav") as err:
        audio.scan(path)
    assert err.value.reason and "Error opening" not in err.value.reason  # libsndfile's own words


def test_missing_directory_and_symlink_loop_raise(tmp_path):
    loop = tmp_path / "loop.wav"
    os.symlink(loop.name, loop)
    for path in (tmp_path / "absent.wav", tmp_path, loop):
        with pytest.raises(audio.AudioReadError):
            audio.probe(path)


def test_names_that_are_not_utf8_still_decode(tmp_path):
    path = tmp_path / os.fsdecode(b"caf\xe9 -x, 'y'.wav")
    sf.write(tmp_path / "plain.wav", tone(0.1), SR)
    (tmp_path / "plain.wav").rename(path)
    assert audio.scan(path).frames == 800


def test_files_are_opened_read_only(tmp_path):
    path = tmp_path / "ro.wav"
    sf.write(path, tone(0.1), SR)
    path.chmod(0o444)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    audio.scan(path)
    audio.read_audio(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
