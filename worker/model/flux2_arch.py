"""FLUX.2's component architectures (the configs of the published repos), as worker/model/flux_arch.py has
FLUX.1's: to build full-size models with random weights offline (the VRAM probe and benchmarks) and to count
what each part weighs without downloading anything.

FLUX.2 [dev] encodes prompts with Mistral-Small-3.1 (24B, a Mistral3ForConditionalGeneration whose vision
tower FLUX.2 does not use for text); klein with Qwen3-4B (4B) or Qwen3-8B (9B). Each pipeline stacks three
intermediate hidden states (`ENCODER_LAYERS_READ`), so the layers past the last one read never matter to
an image (worker/model/text_encoders.py drops them).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.worker.model.flux_arch import FLUX_DEV_TRANSFORMER, FLUX_SCHNELL_TRANSFORMER, randomize

_FLUX2_COMMON: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "attention_head_dim": 128,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
}
FLUX2_TRANSFORMERS: dict[FluxModel, dict[str, Any]] = {
    FluxModel.FLUX_2_DEV: {
        **_FLUX2_COMMON,
        "num_layers": 8,
        "num_single_layers": 48,
        "num_attention_heads": 48,
        "joint_attention_dim": 15360,
        "guidance_embeds": True,
    },
    FluxModel.FLUX_2_KLEIN_4B: {
        **_FLUX2_COMMON,
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,
        "guidance_embeds": False,
    },
    FluxModel.FLUX_2_KLEIN_9B: {
        **_FLUX2_COMMON,
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "joint_attention_dim": 12288,
        "guidance_embeds": False,
    },
}

_QWEN3_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
}
QWEN3_4B: dict[str, Any] = {
    **_QWEN3_COMMON,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "tie_word_embeddings": True,
}
QWEN3_8B: dict[str, Any] = {
    **_QWEN3_COMMON,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "tie_word_embeddings": False,
}
MISTRAL_SMALL_3_1: dict[str, Any] = {
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000000.0,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "pixtral",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "head_dim": 64,
        "image_size": 1540,
        "patch_size": 14,
    },
    "multimodal_projector_bias": False,
    "spatial_merge_size": 2,
    "image_token_index": 10,
    "tie_word_embeddings": False,
}
ENCODER_LAYERS_READ: dict[FluxFamily, tuple[int, ...]] = {
    FluxFamily.FLUX_2: (10, 20, 30),
    FluxFamily.FLUX_2_KLEIN: (9, 18, 27),
}
"""The hidden states each pipeline stacks into its conditioning (diffusers' defaults)."""


def random_text_encoder(model: FluxModel, device: str, dtype: torch.dtype, trimmed: bool = True) -> torch.nn.Module:
    """The model's text encoder with random weights, drawn on `device`: trimmed to the layers its pipeline
    reads (as a worker keeps it), or whole (as a checkpoint holds it)."""
    from fluxfarm.worker.model.text_encoders import trim_text_encoder

    encoder = meta_text_encoder(model)
    if trimmed:
        trim_text_encoder(encoder, ENCODER_LAYERS_READ[MODELS[model].family])
    return randomize(encoder.to(dtype), device, dtype, std=0.02)


def random_flux2_vae(device: str, dtype: torch.dtype) -> AutoencoderKLFlux2:
    vae = randomize(meta_flux2_vae().to(dtype), device, dtype, std=0.02)
    vae.bn.running_var.fill_(1.0)  # a trained VAE's statistics; zeros would divide by ~0
    return vae


def flux2_step_inputs(
    config: dict[str, Any], width: int, height: int, batch: int, device: str, dtype: torch.dtype, text_tokens: int
) -> dict[str, Any]:
    """Random inputs of one FLUX.2 denoising step at `width`x`height`, as its pipelines pass them."""
    rows, cols = height // 16, width // 16
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1))
    text = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
    inputs = {
        "hidden_states": torch.randn(batch, rows * cols, config["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            batch, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype
        ),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": grid.unsqueeze(0).expand(batch, -1, -1).to(device),
        "txt_ids": text.unsqueeze(0).expand(batch, -1, -1).to(device),
        "guidance": torch.full((batch,), 4.0, device=device, dtype=dtype) if config["guidance_embeds"] else None,
        "return_dict": False,
    }
    return inputs


def transformer_config(model: FluxModel) -> dict[str, Any]:
    """The transformer config of a catalog model (Krea and Kontext have FLUX.1 [dev]'s)."""
    if model in FLUX2_TRANSFORMERS:
        return FLUX2_TRANSFORMERS[model]
    return FLUX_SCHNELL_TRANSFORMER if model == FluxModel.FLUX_1_SCHNELL else FLUX_DEV_TRANSFORMER


def meta_flux2_transformer(model: FluxModel) -> Flux2Transformer2DModel:
    with torch.device("meta"):
        return Flux2Transformer2DModel(**FLUX2_TRANSFORMERS[model])


def meta_text_encoder(model: FluxModel) -> torch.nn.Module:
    """The FLUX.2 model's text encoder as its repo ships it, on the meta device."""
    with torch.device("meta"):
        if model == FluxModel.FLUX_2_DEV:
            return Mistral3ForConditionalGeneration(Mistral3Config(**MISTRAL_SMALL_3_1))
        config = QWEN3_4B if model == FluxModel.FLUX_2_KLEIN_4B else QWEN3_8B
        return Qwen3ForCausalLM(Qwen3Config(**config))


def meta_flux2_vae() -> AutoencoderKLFlux2:
    """diffusers' defaults are the published FLUX.2 VAE's."""
    with torch.device("meta"):
        return AutoencoderKLFlux2()
