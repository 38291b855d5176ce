"""The demo set: deterministic, valid 16-bit WAVs, level and length in range, classes that differ."""

from __future__ import annotations

import dataclasses
import logging
import runpy
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from audiocnn import stage
from audiocnn.config import ParamsError, load_section, read_params
from audiocnn.demo import SYNTHS, DemoParams, generate_demo, render_clip, synth_chainsaw, synth_engine

REPO = Path(__file__).resolve().parents[1]


def small_section(**override) -> dict:
    """The real params.yaml demo section, shrunk (and optionally overridden)."""
    return {**read_params(REPO / "params.yaml")["demo"], "clips_per_class": 3, "min_seconds": 0.5,
            "max_seconds": 1.0, **override}


def small(**override) -> DemoParams:
    return load_section({"demo": small_section(**override)}, "demo", DemoParams)


def read_all(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_the_folders_layout_and_counts(tmp_path, caplog):
    params = small()
    with caplog.at_level(logging.INFO, logger="audiocnn.demo"):
        counts = generate_demo(params, tmp_path / "demo")
    assert counts == {label: 3 for label in params.classes}
    expected = {f"{c}/{c}_{i:03d}.wav" for c in params.classes for i in range(3)}
    assert set(read_all(tmp_path / "demo")) == expected  # no temp files left behind
    assert "wrote 12 demo clips" in caplog.text


def test_same_params_give_identical_bytes_and_fresh_dir(tmp_path):
    params = small()
    generate_demo(params, tmp_path / "a")
    (tmp_path / "b" / "stale").mkdir(parents=True)  # an old output is replaced, not merged
    generate_demo(params, tmp_path / "b")
    assert read_all(tmp_path / "a") == read_all(tmp_path / "b")
    generate_demo(dataclasses.replace(params, seed=params.seed + 1), tmp_path / "c")
    assert read_all(tmp_path / "c") != read_all(tmp_path / "a")


def test_a_clip_depends_only_on_seed_class_and_index(tmp_path):
    full = small()
    only_storm = small(classes=["storm"], clips_per_class=2)
    generate_demo(only_storm, tmp_path / "storm_only")
    generate_demo(full, tmp_path / "all")
    clip = "storm/storm_001.wav"
    assert read_all(tmp_path / "storm_only")[clip] == read_all(tmp_path / "all")[clip]


def test_files_are_16_bit_mono_at_the_rate_in_length_and_level_range(tmp_path):
    params = small(clips_per_class=4, sample_rate=16000, min_seconds=0.6, max_seconds=0.9)
    generate_demo(params, tmp_path)
    peaks_dbfs, durations = [], []
    for path in sorted(tmp_path.rglob("*.wav")):
        info = sf.info(path)
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, 16000), path
        audio, _ = sf.read(path, dtype="int16")
        durations.append(audio.size / 16000)
        peaks_dbfs.append(20 * np.log10(np.abs(audio.astype(np.int32)).max() / 32767))
        assert np.abs(audio.astype(np.int32)).max() < 32767, f"{path} clips"
    assert 0.6 - 1e-3 <= min(durations) and max(durations) <= 0.9 + 1e-3
    assert len(set(durations)) > 8  # durations vary
    assert -30.1 <= min(peaks_dbfs) and max(peaks_dbfs) <= -5.9
    assert max(peaks_dbfs) - min(peaks_dbfs) > 6  # random overall level, so normalization matters


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"classes": ["background", "rain"]}, "demo.classes"),
        ({"classes": []}, "demo.classes"),
        ({"classes": ["storm", "storm"]}, "demo.classes"),
        ({"min_seconds": 3.0, "max_seconds": 2.0}, "demo.min_seconds"),
        ({"clips_per_class": 0}, "demo.clips_per_class"),
        ({"sample_rate": 8000}, "demo.sample_rate"),
        ({"seed": -1}, "demo.seed"),
    ],
)
def test_bad_params_name_the_key(override, key):
    with pytest.raises(ParamsError, match=key):
        small(**override)


@pytest.mark.parametrize("label", sorted(SYNTHS))
@pytest.mark.parametrize("sample_rate", [16000, 44100])
def test_synths_are_finite_and_exactly_n_samples(label, sample_rate):
    x = SYNTHS[label](np.random.default_rng(0), 12345, sample_rate)
    assert x.shape == (12345,) and np.all(np.isfinite(x)) and x.std() > 0


def _centroid_hz(x: np.ndarray, sample_rate: int) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    return float((np.fft.rfftfreq(x.size, 1 / sample_rate) * power).sum() / power.sum())


def test_chainsaw_sits_higher_than_engine_on_average():
    sr, n = 22050, 22050
    saw = [_centroid_hz(synth_chainsaw(np.random.default_rng(i), n, sr), sr) for i in range(8)]
    eng = [_centroid_hz(synth_engine(np.random.default_rng(i), n, sr), sr) for i in range(8)]
    assert np.mean(saw) > 1.5 * np.mean(eng), (np.mean(saw), np.mean(eng))


def test_stage_script_writes_the_set_and_fails_cleanly_on_bad_params(tmp_path):
    main = runpy.run_path(str(REPO / "stages" / "demo.py"), run_name="demo_stage")["main"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"demo": small_section(clips_per_class=1)}), encoding="utf-8")
    main(["--out", str(tmp_path / "out"), "--params", str(params_file)])
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.wav")) == [
        "background_000.wav", "chainsaw_000.wav", "engine_000.wav", "storm_000.wav"]
    params_file.write_text(yaml.safe_dump({"demo": small_section(classes=["owl"])}), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        stage.run(main, ["--out", str(tmp_path / "out"), "--params", str(params_file)])
    assert exit_info.value.code == 2


def test_foreground_starts_late_sometimes_over_an_audible_background():
    """Some chainsaw clips open on background alone; no clip opens on digital silence."""
    params = small()
    head_ratios = []
    for index in range(60):
        clip = render_clip(params, "chainsaw", index).astype(np.float64)
        head = clip[: clip.size // 20]
        head_ratios.append(np.sqrt(np.mean(head**2) / np.mean(clip**2)))
    assert min(head_ratios) > 0.01  # the background is always under the foreground
    assert sum(r < 0.5 for r in head_ratios) >= 4  # the chainsaw is not always there from sample 0
