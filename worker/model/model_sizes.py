"""What each architecture's parts take on the GPU, per level and precision: the numbers the VRAM plan adds up.
No torch here, so `fluxfarm plan` runs anywhere.

Resident sizes are counted from the architectures (worker/model/flux_arch.py, worker/model/flux2_arch.py) by
tests/worker/model/level_sizes.py; test_model_sizes.py keeps this table equal to that count. Kept tensors
(embedders, output layers) count as bf16; fp8 is e4m3 with a float32 scale per output row. FLUX.2's text
encoders count as trimmed to the layers their pipeline reads (worker/model/text_encoders.py).

Working memory (a step, a decode, a LoRA fuse, an encode) was measured for FLUX.1 (docs/VRAM.md). FLUX.2's is
scaled from FLUX.1's (`measured` False): a step by the transformer's width (its activations), a fuse by its
largest Linear (the fuser works a layer at a time), an encode from the encoder's activations. Run 10 (an H100,
docs/VRAM.md) measured [dev]'s and klein 4B's step, encode and decode: their step scales are set from it; the
fuse and klein 9B are still scaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel

EncoderPrecision = Literal["bf16", "fp8", "Q4_K"]
"""Best first. Q4_K: every Linear whose rows hold whole blocks; embeddings stay bf16."""
ENCODE_TOKENS = 512


class Architecture(StrEnum):
    """Models whose weights have the same shapes (Krea and Kontext are FLUX.1 [dev]'s)."""

    FLUX_1_DEV = "flux.1-dev"
    FLUX_1_SCHNELL = "flux.1-schnell"
    FLUX_2_DEV = "flux.2-dev"
    FLUX_2_KLEIN_4B = "flux.2-klein-4b"
    FLUX_2_KLEIN_9B = "flux.2-klein-9b"


def architecture_of(model: FluxModel) -> Architecture:
    if MODELS[model].family in (FluxFamily.FLUX_1, FluxFamily.FLUX_1_KONTEXT):
        return Architecture.FLUX_1_SCHNELL if model == FluxModel.FLUX_1_SCHNELL else Architecture.FLUX_1_DEV
    return Architecture(model.value)


def _levels(*gib: float) -> dict[QuantLevel, float]:
    """GiB per level, in the order of the ladder without nf4 (its size is estimated apart)."""
    levels = [level for level in QuantLevel if level != QuantLevel.NF4]
    return dict(zip(levels, gib, strict=True))


@dataclass(frozen=True)
class ArchitectureSizes:
    transformer_gib: dict[QuantLevel, float]
    encoders_gib: dict[EncoderPrecision, float]
    """All text encoders together; FLUX.1's (T5-XXL and CLIP-L) are kept in bf16 only."""
    encoder_parameters: float
    """Of the largest encoder, for the seconds a CPU encode of a prompt takes."""
    encode_working_gib: float
    """Above the encoders while one encoder phase runs (the engine's prompts per forward)."""
    vae_gib: float
    step_scale: float = 1.0
    """A denoising step's working memory over FLUX.1's at the same level and size."""
    fuse_scale: float = 1.0
    """A LoRA fuse's working memory over FLUX.1's at the same level."""
    measured: bool = True

    def transformer(self, level: QuantLevel) -> float:
        if level == QuantLevel.NF4:  # 4.5 bits a weight, Q4_0's bytes
            return self.transformer_gib[QuantLevel.Q4_0]
        return self.transformer_gib[level]


_FLUX1_ENCODERS: dict[EncoderPrecision, float] = {"bf16": 9.118 + 0.236}
_FLUX1_VAE_GIB = 0.161
SIZES: dict[Architecture, ArchitectureSizes] = {
    Architecture.FLUX_1_DEV: ArchitectureSizes(
        _levels(22.168, 11.158, 11.835, 9.166, 7.702, 8.391, 7.702, 6.325, 7.014, 6.325, 4.861, 3.742),
        _FLUX1_ENCODERS,
        4.76e9,
        0.226,
        _FLUX1_VAE_GIB,
    ),
    Architecture.FLUX_1_SCHNELL: ArchitectureSizes(
        _levels(22.149, 11.139, 11.816, 9.147, 7.683, 8.372, 7.683, 6.306, 6.995, 6.306, 4.842, 3.723),
        _FLUX1_ENCODERS,
        4.76e9,
        0.226,
        _FLUX1_VAE_GIB,
    ),
    Architecture.FLUX_2_DEV: ArchitectureSizes(
        _levels(60.021, 30.259, 32.104, 24.893, 20.938, 22.799, 20.938, 17.216, 19.077, 17.216, 13.261, 10.237),
        {"bf16": 32.305, "fp8": 16.787, "Q4_K": 9.985},
        17.34e9,
        2.1,
        0.157,
        step_scale=3.4,  # measured (run 10, H100, 1024²): fp8 2.65 GiB above resident, 3.4x FLUX.1's; GGUF 2.8x
        fuse_scale=4.8,  # measured (run 11, H200, rank 64): fp8 3.23 GiB above resident (4.71x), Q2_K 2.59 (4.76x)
        measured=False,
    ),
    Architecture.FLUX_2_KLEIN_4B: ArchitectureSizes(
        _levels(7.219, 3.663, 3.882, 3.020, 2.547, 2.769, 2.547, 2.102, 2.324, 2.102, 1.629, 1.268),
        {"bf16": 5.8, "fp8": 3.266, "Q4_K": 2.152},
        3.11e9,
        0.85,
        0.157,
        step_scale=1.06,  # measured (run 10, H100, 1024²): fp8 0.82 GiB above resident
        fuse_scale=1.2,  # measured (run 11, H200, rank 64): fp8 0.81 GiB above resident (1.18x)
        measured=False,
    ),
    Architecture.FLUX_2_KLEIN_9B: ArchitectureSizes(
        _levels(16.910, 8.557, 9.073, 7.049, 5.938, 6.461, 5.938, 4.894, 5.416, 4.894, 3.783, 2.934),
        {"bf16": 10.863, "fp8": 6.015, "Q4_K": 3.889},
        5.83e9,
        1.2,
        0.157,
        step_scale=4 / 3,
        fuse_scale=2.67,
        measured=False,
    ),
}


def sizes_of(model: FluxModel) -> ArchitectureSizes:
    return SIZES[architecture_of(model)]
