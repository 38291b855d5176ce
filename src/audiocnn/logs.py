"""One logging setup for every stage and command."""

from __future__ import annotations

import logging
import os


def setup(level: str | None = None) -> None:
    """Log ``time level logger: message`` to stderr; AUDIOCNN_LOG_LEVEL overrides the level."""
    level = level or os.environ.get("AUDIOCNN_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
