"""The quantization ladder: the only place that names the levels a worker can hold, best first,
with what each level costs in memory. The VRAM policy (`worker.plan`) picks from this table.
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


MODELS = ("flux.1-dev", "flux.1-schnell")

RESIDENT_TRANSFORMER_GIB: dict[QuantLevel, tuple[float, float]] = {
    QuantLevel.BF16: (22.168, 22.149),
    QuantLevel.FP8: (11.158, 11.139),
    QuantLevel.Q8_0: (11.835, 11.816),
    QuantLevel.Q6_K: (9.166, 9.147),
    QuantLevel.Q5_K: (7.702, 7.683),
    QuantLevel.Q5_1: (8.391, 8.372),
    QuantLevel.Q5_0: (7.702, 7.683),
    QuantLevel.Q4_K: (6.325, 6.306),
    QuantLevel.Q4_1: (7.014, 6.995),
    QuantLevel.Q4_0: (6.325, 6.306),
    QuantLevel.NF4: (6.33, 6.31),
    QuantLevel.Q3_K: (4.861, 4.842),
    QuantLevel.Q2_K: (3.742, 3.723),
}
"""GiB the transformer takes on the GPU, for (FLUX.1-dev, FLUX.1-schnell). Counted from the architecture
by tests/worker/model/level_sizes.py (test_plan.py keeps them equal); kept tensors (embedders, output layers) count as
bf16; fp8 is e4m3 with a float32 scale per output row. NF4 is estimated from its bytes per weight."""


def resident_transformer_gib(level: QuantLevel, model: str = "flux.1-dev") -> float:
    if model not in MODELS:
        raise FarmError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return RESIDENT_TRANSFORMER_GIB[level][MODELS.index(model)]
