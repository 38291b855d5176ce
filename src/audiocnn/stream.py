"""Live prediction: raw 16-bit PCM from a pipe, one result per window as soon as it is complete.

    arecord -f S16_LE -r 16000 -c 1 | audiocnn predict --stream

Each window is preprocessed like a clip of its own: downmix, resample, DC removal and
loudness normalization over the window only. A file's normalization sees the whole
recording, so the same second of audio can get a different gain (and slightly different
probabilities) in a stream than inside a file; a quiet window is raised to the target
level rather than staying quiet relative to a loud neighbour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from audiocnn.normalize import normalize_signal
from audiocnn.predict import Model

log = logging.getLogger(__name__)

READ_BYTES = 8192  # at most this much is read at once; a window is analysed as soon as it is complete


@dataclass(frozen=True)
class StreamWindow:
    """One window of a live stream, analysed as soon as it was complete."""

    index: int
    start_s: float  # seconds since the stream started
    end_s: float
    probabilities: np.ndarray  # (classes,) float64


def stream_windows(model: Model, stream: BinaryIO, rate: int, channels: int,
                   hop_seconds: float) -> Iterator[StreamWindow]:
    """Raw 16-bit little-endian PCM from ``stream`` -> a result per window as soon as it is complete.

    Windows are ``model.pre.window_seconds`` long, one every ``hop_seconds`` (``rate`` and
    ``channels`` describe the stream; it is resampled like a file). When the stream ends, a
    last window aligned to the end covers any tail, and a stream shorter than one window
    gives one padded window, as ``data.sliding_windows`` does for a clip.
    """
    window = max(1, int(round(model.pre.window_seconds * rate)))  # frames at the stream's rate
    hop = max(1, int(round(hop_seconds * rate)))
    frame_bytes = 2 * channels
    buffer = np.zeros((0, channels), np.int16)  # (frames, channels), starting at frame `offset`
    offset = received = index = skip = 0
    last_end, pending = 0, b""

    def analyse(block: np.ndarray, start: int) -> StreamWindow:
        mono = normalize_signal(block.astype(np.float32) / 32768.0, rate, model.pre.sample_rate, model.pre.normalize)
        probs = np.asarray(model.run(model.window_input(mono)), dtype=np.float64)[0]
        return StreamWindow(index, start / rate, (start + len(block)) / rate, probs)

    read = getattr(stream, "read1", stream.read)
    recent = buffer  # the last `window` frames received (for the end-aligned last window)
    while chunk := read(READ_BYTES):
        pending += chunk
        n = len(pending) // frame_bytes
        if n == 0:
            continue
        new = np.frombuffer(pending[: n * frame_bytes], dtype="<i2").reshape(n, channels)
        pending = pending[n * frame_bytes :]
        received += n
        recent = np.concatenate([recent, new])[-window:]
        dropped = min(skip, n)  # frames a hop longer than the window jumps over
        skip -= dropped
        buffer = np.concatenate([buffer, new[dropped:]])
        while len(buffer) >= window:
            yield analyse(buffer[:window], offset)
            index, last_end = index + 1, offset + window
            skip = max(0, hop - len(buffer))
            buffer, offset = buffer[hop:], offset + hop
    if pending:
        log.warning("stream ended inside a frame: %d trailing byte(s) ignored", len(pending))
    if index == 0 and received:
        yield analyse(recent, 0)  # shorter than a window: one padded window
    elif received > last_end and index > 0:
        yield analyse(recent, received - window)
