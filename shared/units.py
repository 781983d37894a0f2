"""Units, named once: every size in the farm (VRAM, caches, caps, Redis memory) is counted in these bytes,
and every duration shown to a person is written one way."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def duration_text(seconds: float | None) -> str:
    """`1h05m` or `4m07s` (an ETA, a wait); `-` when unknown."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
