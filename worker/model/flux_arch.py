"""FLUX.1's component architectures (the configs of the published repos), to build full-size models
with random weights offline: for the VRAM probe and benchmarks, which cost the same bytes and
FLOPs as trained weights, and for counting parameters without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, Flux2Transformer2DModel, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}

FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def transformer_class_of(config: dict[str, Any]) -> type[FluxTransformer2DModel] | type[Flux2Transformer2DModel]:
    """FLUX.2's configs name a timestep-guidance width, FLUX.1's a pooled projection."""
    return Flux2Transformer2DModel if "timestep_guidance_channels" in config else FluxTransformer2DModel


def write_transformer_config(folder: Path, config: dict[str, Any]) -> Path:
    """A folder that `from_single_file(config=folder, subfolder="transformer")` reads."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": transformer_class_of(config).__name__, **config}
    (folder / "transformer" / "config.json").write_text(json.dumps(payload, indent=2))
    return folder


def meta_transformer(config: dict[str, Any]) -> torch.nn.Module:
    """The transformer (FLUX.1's or FLUX.2's, by its config) on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return transformer_class_of(config)(**config)


def randomize(module: torch.nn.Module, device: str, dtype: torch.dtype, std: float) -> torch.nn.Module:
    """Materialize a meta-device module with random weights; integer buffers (position ids) get aranges."""
    module.to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
        for buffer in module.buffers():
            if buffer.is_floating_point() or buffer.dim() == 0:  # a 0-dim one: BatchNorm's batch count
                buffer.zero_()
            else:
                buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
    return module.to(dtype)


def random_vae(device: str, dtype: torch.dtype) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE)
    return randomize(vae.to(dtype), device, dtype, std=0.02)


def random_t5(device: str, dtype: torch.dtype, config: dict[str, Any] = T5_XXL) -> T5EncoderModel:
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    return randomize(model.to(dtype), device, dtype, std=0.02)


def random_clip(device: str, dtype: torch.dtype, config: dict[str, Any] = CLIP_L) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    return randomize(model.to(dtype), device, dtype, std=0.02)
