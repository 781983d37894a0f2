"""Tiny LoRAs and ControlNets for the tiny model, made offline the way users make theirs: a LoRA trained
with peft and saved by diffusers (with its adapter config), and a ControlNet made by diffusers from
the transformer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxControlNetModel, FluxPipeline, FluxTransformer2DModel
from PIL import Image

TRANSFORMER_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_mlp",
    "proj_out",
]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FLUX2_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "to_qkv_mlp_proj",
]
"""Every Linear kind of FLUX.2's blocks but the single blocks' output (peft matches by suffix, and "to_out" is
also the double blocks' ModuleList)."""


def _randomize_lora(module: torch.nn.Module, seed: int, std: float) -> None:
    """peft starts lora_B at zero (an untrained LoRA changes nothing); a trained one does not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def write_peft_lora(
    model_dir: Path,
    out_dir: Path,
    part: str = "transformer",
    seed: int = 0,
    pipeline: Any = FluxPipeline,
    std: float = 0.05,
) -> Path:
    """A peft LoRA on the tiny model's transformer (rank 4, alpha 8: scale 2) or CLIP text encoder (rank 2,
    alpha 2), saved by diffusers with its adapter config. `pipeline`: the tiny model's family's class."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = pipeline.from_pretrained(model_dir, dtype=torch.float32)
    if part == "transformer":
        targets = TRANSFORMER_TARGETS if pipeline is FluxPipeline else FLUX2_TARGETS
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        pipe.transformer.add_adapter(config)
        _randomize_lora(pipe.transformer, seed, std)
        layers = {"transformer_lora_layers": get_peft_model_state_dict(pipe.transformer)}
        metadata = {"transformer_lora_adapter_metadata": config.to_dict()}
    else:
        # peft directly: transformers' own add_adapter wants a newer peft than the registry holds.
        config = LoraConfig(r=2, lora_alpha=2, target_modules=CLIP_TARGETS)
        inject_adapter_in_model(config, pipe.text_encoder)
        _randomize_lora(pipe.text_encoder, seed, 0.2)
        layers = {"text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder)}
        metadata = {"text_encoder_lora_adapter_metadata": config.to_dict()}
    pipeline.save_lora_weights(out_dir, weight_name="lora.safetensors", **layers, **metadata)
    return out_dir / "lora.safetensors"


def load_clip_lora_with_peft(pipe: FluxPipeline, lora: Path) -> None:
    """The reference for a CLIP LoRA: peft's own LoRA layers in the text encoder, loaded from the file."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {k.removeprefix("text_encoder."): v for k, v in load_file(lora).items() if k.startswith("text_encoder.")}
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=CLIP_TARGETS), pipe.text_encoder)
    set_peft_model_state_dict(pipe.text_encoder, state)


def write_tiny_controlnet(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A FluxControlNetModel of one double and one single block, with random (non-zero) weights."""
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=torch.float32)
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def control_png(width: int, height: int, seed: int = 0) -> bytes:
    """A canny-like control image: white strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(12):
        row = rng.integers(0, height)
        pixels[row, :, :] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """An image PNG cannot shrink (random pixels): about 3 bytes a pixel, for inputs of a known size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


LORA_MODULES = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_q_proj",
    "single_transformer_blocks.0.proj_out",
)


def write_lora_with_config(out_dir: Path, config: dict[str, Any]) -> Path:
    """A rank-4 LoRA saved by diffusers with the adapter config a hostile or an honest trainer would write
    (random weights, no model needed)."""
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name in LORA_MODULES:
        layers[f"{name}.lora_A.weight"] = torch.randn(4, 16, generator=generator)
        layers[f"{name}.lora_B.weight"] = torch.randn(16, 4, generator=generator)
    metadata = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "add_q_proj", "proj_out"], **config}
    FluxPipeline.save_lora_weights(
        out_dir,
        weight_name="lora.safetensors",
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
    )
    return out_dir / "lora.safetensors"
