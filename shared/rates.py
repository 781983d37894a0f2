"""One way to turn "n things finished since t" into a rate, for workers and datasets alike."""

from __future__ import annotations

RATE_WINDOW_S = 600.0
"""Rates count what finished in this many recent seconds."""


def per_hour(count: int, first: float, now: float) -> float:
    """`count` events, the first at `first`, measured until `now` (seconds): a stalled farm's rate
    falls as `now` moves on, instead of freezing at its last value."""
    return count / max(now - first, 1.0) * 3600
