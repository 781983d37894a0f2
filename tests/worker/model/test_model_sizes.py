"""The VRAM plan's size table equals the count from each architecture's classes (meta device, no weights)."""

from __future__ import annotations

import pytest

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxModel
from fluxfarm.worker.model.flux2_arch import (
    ENCODER_LAYERS_READ,
    meta_flux2_transformer,
    meta_flux2_vae,
    meta_text_encoder,
)
from fluxfarm.worker.model.flux_arch import FLUX_DEV_TRANSFORMER, FLUX_SCHNELL_TRANSFORMER, meta_transformer
from fluxfarm.worker.model.model_sizes import SIZES, Architecture, architecture_of
from fluxfarm.worker.model.text_encoders import trim_text_encoder
from tests.worker.model.level_sizes import bf16_bytes, fp8_bytes, gguf_linear_bytes, transformer_bytes

GIB = 1024**3
FLUX2 = {
    Architecture.FLUX_2_DEV: FluxModel.FLUX_2_DEV,
    Architecture.FLUX_2_KLEIN_4B: FluxModel.FLUX_2_KLEIN_4B,
    Architecture.FLUX_2_KLEIN_9B: FluxModel.FLUX_2_KLEIN_9B,
}


def _meta_transformer(architecture: Architecture):
    if architecture in FLUX2:
        return meta_flux2_transformer(FLUX2[architecture])
    return meta_transformer(
        FLUX_SCHNELL_TRANSFORMER if architecture == Architecture.FLUX_1_SCHNELL else FLUX_DEV_TRANSFORMER
    )


@pytest.mark.parametrize("architecture", list(Architecture))
def test_transformer_sizes_equal_the_architecture_count(architecture: Architecture) -> None:
    model = _meta_transformer(architecture)
    for level, gib in SIZES[architecture].transformer_gib.items():
        assert gib == pytest.approx(transformer_bytes(model, level) / GIB, abs=0.001), level


@pytest.mark.parametrize("architecture", list(FLUX2))
def test_flux2_encoder_and_vae_sizes_equal_the_trimmed_architecture_count(architecture: Architecture) -> None:
    model = FLUX2[architecture]
    encoder = meta_text_encoder(model)
    trim_text_encoder(encoder, ENCODER_LAYERS_READ[MODELS[model].family])
    sizes = SIZES[architecture]
    assert sizes.encoders_gib["bf16"] == pytest.approx(bf16_bytes(encoder) / GIB, abs=0.001)
    assert sizes.encoders_gib["fp8"] == pytest.approx(fp8_bytes(encoder) / GIB, abs=0.001)
    assert sizes.encoders_gib["Q4_K"] == pytest.approx(gguf_linear_bytes(encoder, QuantLevel.Q4_K) / GIB, abs=0.001)
    assert sizes.encoder_parameters == pytest.approx(bf16_bytes(encoder) / 2, rel=0.01)
    assert sizes.vae_gib == pytest.approx(bf16_bytes(meta_flux2_vae()) / GIB, abs=0.001)


def test_every_catalog_model_has_an_architecture() -> None:
    assert {architecture_of(model) for model in FluxModel} == set(Architecture)
    assert SIZES[architecture_of(FluxModel.FLUX_1_KONTEXT_DEV)].transformer(QuantLevel.BF16) == pytest.approx(22.168)
