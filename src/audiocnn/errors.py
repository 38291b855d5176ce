"""Errors a user can act on: each message names the offending file, key or path."""

from __future__ import annotations


class DataError(ValueError):
    """The input data cannot go through a stage (too many rejects, a class too small to split)."""
