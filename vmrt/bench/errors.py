"""The bench's own error, below every other module of the package."""

from __future__ import annotations


class BenchError(Exception):
    """A mode failed to do something; recorded with the mode, the rest of the bench goes on."""
