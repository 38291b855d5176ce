"""Windows over a recording and the events they make: pure functions on probability sequences.

A recording longer than the model's window is cut into windows exactly as evaluate cuts
a test clip (``data.sliding_windows``: a start every hop, plus one aligned to the end);
``window_starts`` gives those starts so each window's probabilities get a time span.
``label_windows`` names each window (its top class, or a ``target`` class) and drops
those under a ``threshold``; ``merge_events`` joins consecutive kept windows with the
same label into events such as ``chainsaw 12.0-15.5 s, p=0.93``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Window:
    """One analysed window: its span, its label and that label's probability."""

    index: int  # position in the recording's window sequence (consecutive windows: index + 1)
    start_s: float
    end_s: float
    label: str
    probability: float


@dataclass(frozen=True)
class Event:
    """Consecutive kept windows with the same label, merged."""

    label: str
    start_s: float
    end_s: float
    probability: float  # mean of the label's probability over the windows
    peak: float  # max of the label's probability over the windows
    windows: int


def window_starts(frames: int, window_frames: int, hop_frames: int) -> list[int]:
    """Start frames of the windows ``data.sliding_windows`` cuts from ``frames`` feature frames.

    A start every ``hop_frames`` and one aligned to the end when the grid misses it; a clip
    shorter than one window gives the single start 0 (its window is padded).
    """
    if window_frames < 1 or hop_frames < 1:
        raise ValueError(f"window_frames={window_frames} and hop_frames={hop_frames} must be >= 1")
    last = max(frames - window_frames, 0)
    starts = list(range(0, last + 1, hop_frames))
    if starts[-1] != last:
        starts.append(last)
    return starts


def hop_frames(hop_seconds: float, sample_rate: int, hop_length: int) -> int:
    """Feature frames between window starts, at least 1 (evaluate's rule; tests keep the two equal)."""
    return max(1, int(round(hop_seconds * sample_rate / hop_length)))


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) of one (classes,) vector, best first (ties: class order)."""
    order = np.argsort(-np.asarray(probs, dtype=np.float64), kind="stable")[:k]
    return [(labels[i], float(probs[i])) for i in order]


def label_windows(probs: np.ndarray, starts_s: Sequence[float], ends_s: Sequence[float], labels: Sequence[str],
                  threshold: float | None = None, target: str | None = None) -> list[Window]:
    """Name each window of (n_windows, classes) ``probs``; keep those that pass.

    Without ``target`` a window is labelled with its top class and kept when that class's
    probability is >= ``threshold`` (all kept when None). With ``target`` it is labelled
    ``target`` and kept when p(target) >= ``threshold`` (0.5 when None).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if target is not None and target not in labels:
        raise ValueError(f"target {target!r} is not a model label ({', '.join(labels)})")
    if target is not None and threshold is None:
        threshold = 0.5
    kept = []
    for i, row in enumerate(probs):
        c = labels.index(target) if target is not None else int(np.argmax(row))
        if threshold is None or row[c] >= threshold:
            kept.append(Window(i, float(starts_s[i]), float(ends_s[i]), labels[c], float(row[c])))
    return kept


def merge_events(windows: Sequence[Window]) -> list[Event]:
    """Join runs of consecutive windows (index + 1) with the same label into events, in time order."""
    events: list[Event] = []
    run: list[Window] = []

    def close() -> None:
        if run:
            p = [w.probability for w in run]
            events.append(Event(run[0].label, run[0].start_s, max(w.end_s for w in run), float(np.mean(p)),
                                float(max(p)), len(run)))
            run.clear()

    for window in sorted(windows, key=lambda w: w.index):
        if run and (window.index != run[-1].index + 1 or window.label != run[-1].label):
            close()
        run.append(window)
    close()
    return events
