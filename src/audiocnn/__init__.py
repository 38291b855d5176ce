"""audiocnn: a reproducible audio-classification pipeline (DVC stages over this library)."""

__version__ = "0.1.0"
