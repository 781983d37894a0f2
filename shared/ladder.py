"""The quantization ladder: the only place that names the levels a worker can hold, best first. What each
level costs in memory, per architecture, is in worker/model/model_sizes.py; the VRAM plan picks from both.
"""

from __future__ import annotations

from enum import StrEnum

from fluxfarm.shared.errors import FarmError


class QuantLevel(StrEnum):
    """A level of the FLUX transformer. GGUF levels carry the GGML type name they are stored as."""

    BF16 = "bf16"
    FP8 = "fp8"
    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K = "Q5_K"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_K = "Q4_K"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"
    NF4 = "nf4"
    Q3_K = "Q3_K"
    Q2_K = "Q2_K"

    @property
    def is_gguf(self) -> bool:
        return self.value[0] == "Q"

    @property
    def quality_rank(self) -> int:
        """0 is the best; a larger rank loses more to quantization (the enum's order)."""
        return _RANKED.index(self)

    def at_least(self, other: QuantLevel) -> bool:
        """True when this level is as good as `other` or better."""
        return self.quality_rank <= other.quality_rank


_RANKED: tuple[QuantLevel, ...] = tuple(QuantLevel)


def parse_level(name: str) -> QuantLevel:
    """A level from its name, case-insensitive; an unknown name lists the valid ones."""
    for level in QuantLevel:
        if level.value.lower() == name.strip().lower():
            return level
    raise FarmError(f"unknown quantization level {name!r}; valid levels: {', '.join(QuantLevel)}")
