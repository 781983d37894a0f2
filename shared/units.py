"""Byte units, named once: every size in the farm (VRAM, caches, caps, Redis memory) is counted in these."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
