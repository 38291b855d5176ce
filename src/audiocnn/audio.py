"""Shared audio settings (params section ``audio``) and audio decoding helpers."""

from __future__ import annotations

from dataclasses import dataclass

from audiocnn.config import check


@dataclass(frozen=True)
class AudioParams:
    """``audio``: values every stage after ingest shares."""

    sample_rate: int  # Hz, the rate all clips are resampled to

    def __post_init__(self) -> None:
        check(8000 <= self.sample_rate <= 192000, "sample_rate", self.sample_rate, "must be within 8000..192000 Hz")
