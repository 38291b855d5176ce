"""The built-in demo set: procedural forest-monitoring sounds in four classes.

``background`` (rain-forest ambience), ``chainsaw``, ``engine`` and ``storm``. Each
foreground clip is mixed over a fresh background at a random SNR, starts late or
stops early at random, and is written at a random peak level, so the set is learnable
but not trivially separable (background/storm and chainsaw/engine blur at low SNR).
Every clip is seeded from (seed, class, index) alone: same params, same bytes, in
any order. Only numpy, vectorised; the default 400 clips take a few seconds.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile as sf

from audiocnn import fileio
from audiocnn.config import check

log = logging.getLogger(__name__)

SNR_DB = (-3.0, 15.0)  # foreground over background, measured where the foreground plays
PEAK_DBFS = (-30.0, -6.0)  # random overall level of each written clip
TAU = 2.0 * np.pi


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale to RMS 1 (silence stays silence)."""
    return x / np.float32(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-12)


def _gain(f: np.ndarray, exponent: float, lo: float, hi: float, order: float) -> np.ndarray:
    """Amplitude response: 1/f**(exponent/2) tilt, Butterworth-like high-pass lo, low-pass hi (0 = none)."""
    g = np.maximum(f, np.float32(1.0)) ** np.float32(-exponent / 2.0)
    if lo:
        g /= np.sqrt(1.0 + (np.float32(lo) / np.maximum(f, np.float32(1e-3))) ** np.float32(2 * order))
    if hi:
        g /= np.sqrt(1.0 + (f / np.float32(hi)) ** np.float32(2 * order))
    return g


def _noise(rng, n, sr, exponent=0.0, lo=0.0, hi=0.0, order=2.0) -> np.ndarray:
    """Coloured, band-limited Gaussian noise of RMS 1, shaped in the frequency domain. (n,) float32"""
    m = scipy.fft.next_fast_len(n, real=True)
    f = np.fft.rfftfreq(m, 1.0 / sr).astype(np.float32)  # (m//2+1,) Hz
    spec = rng.standard_normal(2 * f.size, dtype=np.float32).view(np.complex64)
    return _unit(scipy.fft.irfft(spec * _gain(f, exponent, lo, hi, order), m)[:n])


def _filter(x, sr, exponent=0.0, lo=0.0, hi=0.0, order=2.0) -> np.ndarray:
    """Filter a signal with the same response as ``_noise`` (FFT, padded against wrap-around). float32"""
    m = scipy.fft.next_fast_len(x.size + sr // 10, real=True)
    f = np.fft.rfftfreq(m, 1.0 / sr).astype(np.float32)  # (m//2+1,) Hz
    return scipy.fft.irfft(scipy.fft.rfft(x.astype(np.float32), m) * _gain(f, exponent, lo, hi, order), m)[: x.size]


def _curve(rng, n, knots, lo, hi) -> np.ndarray:
    """A smooth random curve through ``knots`` uniform draws in [lo, hi], eased between. (n,) float32"""
    y = rng.uniform(lo, hi, max(int(knots), 2)).astype(np.float32)
    size = -(-n // (y.size - 1))  # samples per segment
    t = np.arange(size, dtype=np.float32) / size
    ease = t * t * (3.0 - 2.0 * t)
    return (y[:-1, None] + (y[1:] - y[:-1])[:, None] * ease).ravel()[:n]


def _ramps(values: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """Piecewise-linear tracks, values[:, k] -> values[:, k+1] over lengths[k] samples, then held. (tracks, n)"""
    seg = np.repeat(np.arange(lengths.size), lengths)[:n]  # (n,) ramp index
    seg = np.pad(seg, (0, n - seg.size), constant_values=lengths.size)  # hold: ramp k to k
    starts = np.concatenate([[0], np.cumsum(lengths)])
    frac = ((np.arange(n) - starts[seg]) / np.append(lengths, 1)[seg]).astype(np.float32)
    values = np.concatenate([values, values[:, -1:]], axis=1).astype(np.float32)
    return values[:, seg] + (values[:, seg + 1] - values[:, seg]) * frac


def _phase(f_hz, sr: int, rng, n: int = 0) -> np.ndarray:
    """Running phase in [0, 4pi) (so half orders stay smooth) of a (n,) Hz track or a constant Hz. (n,) float32"""
    steps = np.arange(1, n + 1.0) * f_hz if np.ndim(f_hz) == 0 else np.cumsum(f_hz, dtype=np.float64)
    return np.mod(rng.uniform(0.0, TAU) + TAU * steps / sr, 2 * TAU).astype(np.float32)


def _add(out: np.ndarray, x: np.ndarray, start: int) -> None:
    """Add ``x`` into ``out`` at sample ``start``, cropping whatever falls outside."""
    a, b = max(start, 0), min(start + x.size, out.size)
    if a < b:
        out[a:b] += x[a - start : b - start]


def _rain(rng, n, sr, drops_per_s) -> np.ndarray:
    """Rain: Poisson drop clicks (a dense crackle) over band-passed hiss. (n,) RMS 1"""
    count = rng.poisson(drops_per_s * n / sr)
    clicks = np.bincount(rng.integers(0, n, count), rng.lognormal(0.0, 0.6, count), minlength=n)
    crackle = _unit(_filter(clicks, sr, 0.0, rng.uniform(800, 2500), min(rng.uniform(5000, 9000), 0.45 * sr), 2))
    hiss = _noise(rng, n, sr, rng.uniform(0.0, 1.0), rng.uniform(300, 1200), 0.45 * sr, 1.5)
    return _unit(crackle + rng.uniform(0.3, 1.5) * hiss)


def _birds(rng, n, sr) -> np.ndarray:
    """Bird calls: 1-4 repeats of a 2-6 kHz FM sweep with a trill, at random times. (n,)"""
    out, top = np.zeros(n, np.float32), min(6000.0, 0.45 * sr)
    for _ in range(rng.poisson(rng.uniform(0.3, 3.0) * n / sr)):
        size = int(rng.uniform(0.04, 0.25) * sr)
        t = np.arange(size, dtype=np.float32) / sr
        f_hz = np.linspace(rng.uniform(2000, top), rng.uniform(2000, top), size)
        f_hz *= 1.0 + rng.uniform(0, 0.06) * np.sin(TAU * rng.uniform(8, 60) * t)
        phase = _phase(f_hz, sr, rng)
        call = (np.sin(phase) + rng.uniform(0, 0.3) * np.sin(2 * phase)) * np.sin(np.pi * t * sr / size) ** 2
        call *= rng.uniform(0.2, 1.0)
        start, step = int(rng.integers(-size, n)), size + int(rng.uniform(0.03, 0.2) * sr)
        for k in range(int(rng.integers(1, 5))):
            _add(out, call, start + k * step)
    return out


def synth_background(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Rain-forest ambience: coloured canopy noise, bird chirps, insect drones, sometimes light rain."""
    n, sr = n_samples, sample_rate
    x = _noise(rng, n, sr, rng.uniform(0.3, 2.0), rng.uniform(20, 200), rng.uniform(2000, 0.45 * sr), 1.0)
    x *= _curve(rng, n, 2 + n / sr, 0.6, 1.2)
    if rng.random() < 0.85:
        x += rng.uniform(0.3, 3.0) * _birds(rng, n, sr)
    if rng.random() < 0.6:  # insect drone: a high tone, amplitude-modulated at 15-80 Hz
        carrier = _phase(rng.uniform(3500, min(9000, 0.42 * sr)), sr, rng, n)
        am = 1.0 + rng.uniform(0.5, 1.0) * np.sin(_phase(rng.uniform(15, 80), sr, rng, n))
        x += rng.uniform(0.05, 0.6) * np.sin(carrier) * am * _curve(rng, n, 2 + n / sr, 0.2, 1.0)
    if rng.random() < 0.25:
        x += rng.uniform(0.1, 0.5) * _rain(rng, n, sr, rng.uniform(100, 800))
    return x


def synth_chainsaw(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Two-stroke buzz: sawtooth-like 70-210 Hz firing, RPM ramps between idle/rev/cut, chain noise."""
    n, sr = n_samples, sample_rate
    idle, full = rng.uniform(70, 100), rng.uniform(140, 210)  # Hz
    lengths = (rng.uniform(0.12, 0.6, 4 + int(8 * n / sr)) * sr).astype(np.int64)  # samples per ramp
    state = rng.choice(3, lengths.size + 1, p=[0.3, 0.3, 0.4])  # 0 idle, 1 revving, 2 cutting
    speed = np.choose(state, [idle, full, full * rng.uniform(0.72, 0.9)])  # Hz per state
    f0, cutting, revving = _ramps(np.stack([speed, state == 2, state > 0]), lengths, n)  # (n,) Hz, 0..1, 0..1
    f0 *= 1.0 + 0.015 * _curve(rng, n, 30 * n / sr, -1.0, 1.0)  # cycle-to-cycle jitter
    phase = _phase(f0, sr, rng)
    cycle = phase / TAU
    saw = 2.0 * (cycle - np.floor(cycle)) - 1.0
    pulse = np.exp(rng.uniform(4, 16) * (np.cos(phase) - 1.0))  # firing pulse (n,) 0..1
    tone = _unit(_filter(saw + rng.uniform(0.3, 1.5) * pulse, sr, 0.0, 60.0, rng.uniform(800, 7000), 1.0))
    exhaust = _noise(rng, n, sr, 0.5, 400.0, min(8000.0, 0.45 * sr)) * (0.3 + pulse)
    chain = _noise(rng, n, sr, 0.0, rng.uniform(1500, 3000), 0.45 * sr) * cutting
    return (0.6 + 0.4 * revving) * (tone + rng.uniform(0.1, 0.5) * exhaust + rng.uniform(0.2, 1.0) * chain)


def synth_engine(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Vehicle or generator: 25-70 Hz firing with half-order harmonics, slow RPM drift, rumble."""
    n, sr = n_samples, sample_rate
    f0 = rng.uniform(25, 70) * _curve(rng, n, 2 + n / sr / 1.5, 0.92, 1.08)
    phase = _phase(f0, sr, rng)
    pulse = np.exp(rng.uniform(15, 60) * (np.cos(phase) - 1.0))  # sharp firing pulse (n,) 0..1
    tone = _unit(_filter(pulse + rng.uniform(0.1, 0.4) * np.cos(phase / 2), sr, 0.0, 20.0, rng.uniform(600, 3000), 1.5))
    rumble = _noise(rng, n, sr, 2.0, 15.0, rng.uniform(80, 250)) * (0.6 + pulse)
    intake = _noise(rng, n, sr, 1.0, rng.uniform(150, 400), rng.uniform(1500, 4000)) * (0.2 + pulse)  # valves, fan
    x = tone + rng.uniform(0.2, 0.7) * rumble + rng.uniform(0.1, 0.5) * intake
    if rng.random() < 0.5:  # a vehicle passing by, not a steady generator
        t = np.arange(n, dtype=np.float32) / n
        x *= 0.3 + np.exp(-0.5 * ((t - rng.uniform(0.2, 0.8)) / rng.uniform(0.15, 0.5)) ** 2)
    return x


def synth_storm(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Storm: heavy rain crackle, wind gusts, and thunder (low rumble bursts with slow decay)."""
    n, sr = n_samples, sample_rate
    x = rng.uniform(0.3, 1.5) * _rain(rng, n, sr, rng.uniform(800, 5000)) * _curve(rng, n, 2 + n / sr, 0.6, 1.0)
    gusts = _curve(rng, n, 2 + rng.uniform(0.5, 2.0) * n / sr, 0.05, 1.0) ** rng.uniform(1.5, 3.0)
    x += rng.uniform(0.2, 1.5) * _noise(rng, n, sr, 1.5, rng.uniform(60, 150), rng.uniform(600, 1500)) * gusts
    t = np.arange(n, dtype=np.float32) / sr
    for _ in range(rng.poisson(1.0)):
        onset = rng.uniform(-0.5, n / sr - 0.3)  # seconds; may already be decaying at the start
        since = t - np.float32(onset)  # (n,) seconds after the strike
        env = np.clip(since / rng.uniform(0.02, 0.3), 0, 1) * np.exp(-np.maximum(since, 0) / rng.uniform(0.4, 2.0))
        boom = _noise(rng, n, sr, 2.0, 20.0, rng.uniform(80, 250)) * _curve(rng, n, 4 * n / sr, 0.3, 1.0)
        x += rng.uniform(1.0, 4.0) * boom * env
    return x


SYNTHS = {"background": synth_background, "chainsaw": synth_chainsaw, "engine": synth_engine, "storm": synth_storm}


@dataclass(frozen=True)
class DemoParams:
    """``demo``: which classes, how many clips, how long, at what rate, from which seed."""

    classes: tuple[str, ...]
    clips_per_class: int
    min_seconds: float
    max_seconds: float
    sample_rate: int  # Hz of the written files
    seed: int

    def __post_init__(self) -> None:
        unknown = sorted(set(self.classes) - set(SYNTHS))
        check(bool(self.classes), "classes", self.classes, "must name at least one class")
        check(not unknown, "classes", list(self.classes), f"has unknown {unknown}; known: {', '.join(SYNTHS)}")
        check(len(set(self.classes)) == len(self.classes), "classes", list(self.classes), "has duplicates")
        check(1 <= self.clips_per_class <= 1000, "clips_per_class", self.clips_per_class, "must be in 1..1000")
        lo, hi = self.min_seconds, self.max_seconds
        check(lo >= 0.25, "min_seconds", lo, "must be at least 0.25")
        check(lo <= hi, "min_seconds", lo, f"exceeds max_seconds={hi}")
        check(hi <= 60, "max_seconds", hi, "must be at most 60")
        check(16000 <= self.sample_rate <= 96000, "sample_rate", self.sample_rate, "must be within 16000..96000 Hz")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")


def render_clip(params: DemoParams, label: str, index: int) -> np.ndarray:
    """Clip ``index`` of class ``label`` as int16 PCM, from its own seed only. (samples,) int16"""
    seq = np.random.SeedSequence([params.seed, zlib.crc32(label.encode()), index])
    mix, fg_rng, bg_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    sr = params.sample_rate
    n = int(round(mix.uniform(params.min_seconds, params.max_seconds) * sr))  # samples
    x = synth_background(bg_rng, n, sr)  # (n,) float
    if label != "background":
        fg = SYNTHS[label](fg_rng, n, sr)
        start = int(mix.uniform(0, 0.4) * n) if mix.random() < 0.35 else 0  # foreground starts late
        stop = n - int(mix.uniform(0, 0.4) * n) if mix.random() < 0.35 else n  # or stops early
        fade = max(int(mix.uniform(0.01, 0.2) * sr), 1)  # samples
        t = np.arange(n)
        fg *= np.clip(np.minimum((t - start) / fade if start else 1.0, (stop - t) / fade if stop < n else 1.0), 0, 1)
        ratio = np.sqrt(np.mean(fg[start:stop] ** 2) / (np.mean(x[start:stop] ** 2) + 1e-12))
        x = fg + x * ratio * 10 ** (-mix.uniform(*SNR_DB) / 20)
    x *= 10 ** (mix.uniform(*PEAK_DBFS) / 20) / (np.max(np.abs(x)) + 1e-12)
    return np.round(x * 32767).astype(np.int16)


def generate_demo(params: DemoParams, out_dir: Path) -> dict[str, int]:
    """Write ``out_dir/<class>/<class>_<NNN>.wav`` (16-bit mono) into a fresh dir; return clips per class."""
    began = time.perf_counter()
    out_dir = fileio.fresh_dir(out_dir)
    counts: dict[str, int] = {}
    for label in params.classes:
        for index in range(params.clips_per_class):
            with fileio.atomic_path(out_dir / label / f"{label}_{index:03d}.wav") as tmp:
                sf.write(tmp, render_clip(params, label, index), params.sample_rate, format="WAV", subtype="PCM_16")
        counts[label] = params.clips_per_class
    log.info("wrote %d demo clips to %s (%s) in %.1f s", sum(counts.values()), out_dir,
             ", ".join(f"{k}: {v}" for k, v in counts.items()), time.perf_counter() - began)
    return counts
