"""The machine's ceiling for FFT-heavy work: one process alone against two at once, each doing the same work.

features.py measures its ceiling with a pure-Python loop; this one-off probe (2026-12-06,
benchmarks/RESULTS.md, "Feature throughput") runs a log-mel-like loop instead, to see whether
the spectrogram stage's per-clip work itself scales worse than a busy loop on this machine.
Prints both ratios (2 x one process's seconds / the pair's seconds), 5 repeats each.
Run: ``python benchmarks/prototypes/fft_ceiling.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the stage scripts: processes, not BLAS threads

import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPEATS = 5


def log_mel_loop(iterations: int) -> float:
    """Seconds for ``iterations`` log-mel spectra of one FSDD-sized clip (45 frames of 256 samples, 40 mels)."""
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((45, 256)).astype(np.float32)  # (frames, n_fft)
    window = np.hanning(256).astype(np.float32)
    filterbank = rng.random((129, 40)).astype(np.float32)  # (n_fft/2+1, n_mels)
    start = time.perf_counter()
    for _ in range(iterations):
        power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, 129)
        db = 10 * np.log10(np.maximum(power.astype(np.float32) @ filterbank, 1e-10))  # (frames, n_mels)
        db.max()
    return time.perf_counter() - start


def busy_loop(iterations: int) -> float:
    """Seconds for a pure-Python counting loop (features.py's ceiling)."""
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start


def ceiling(work, iterations: int) -> list[float]:
    """Per repeat: 2 x the seconds of ``work`` alone / the seconds of two copies at once."""
    ratios = []
    for _ in range(REPEATS):
        alone = work(iterations)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            start = time.perf_counter()
            pool.map(work, [iterations, iterations])
            pair = time.perf_counter() - start
        ratios.append(2 * alone / pair)
    return ratios


if __name__ == "__main__":
    for work, iterations in ((log_mel_loop, 12_000), (busy_loop, 12_000_000)):
        ratios = ceiling(work, iterations)
        print(f"{work.__name__}: {', '.join(f'{r:.2f}x' for r in ratios)}, median {statistics.median(ratios):.2f}x")
