"""The random-weight FLUX.1 every bench configuration shares: full size on a GPU (the same bytes and FLOPs
as trained weights), the tiny model on a CPU; built once, kept in host memory between runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxPipeline
from transformers import CLIPTextModel, T5EncoderModel

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.flux_arch import (
    TRANSFORMERS,
    random_clip,
    random_t5,
    random_vae,
    write_transformer_config,
)
from fluxfarm.worker.model.pipeline import compute_dtype
from fluxfarm.worker.tools.tiny_model import build_tiny_pipeline, clip_tokenizer, t5_tokenizer
from fluxfarm.worker.tools.tiny_parts import flux_scheduler
from fluxfarm.worker.tools.vram_probe import level_state_dict, load_level, random_master_weights


@dataclass
class FluxParts:
    """The random-weight components every configuration shares (host memory between runs)."""

    transformer_config: dict[str, Any]
    master: dict[str, torch.Tensor]
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    config_dir: Path
    dtype: torch.dtype
    states: dict[QuantLevel, dict[str, torch.Tensor]] = field(default_factory=dict)

    def state(self, level: QuantLevel, device: str) -> dict[str, torch.Tensor]:
        if level not in self.states:
            self.states[level] = level_state_dict(self.master, level, device)
        return self.states[level]

    def transformer(self, level: QuantLevel, device: str) -> torch.nn.Module:
        """The transformer at `level` on `device`, loaded through diffusers' own code paths."""
        return load_level(self.state(level, device), level, self.config_dir, device, self.dtype)

    def pipeline(self, transformer: torch.nn.Module | None) -> FluxPipeline:
        return FluxPipeline(
            scheduler=flux_scheduler(),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=t5_tokenizer(),
            transformer=transformer,
        )


def build_parts(model: str, device: str, folder: Path) -> FluxParts:
    """Full-size random FLUX.1 (weights drawn on `device`, kept on the host) or, for "tiny", the tiny model."""
    dtype = compute_dtype(device)
    torch.manual_seed(0)
    if model == "tiny":
        pipe = build_tiny_pipeline()
        config = dict(pipe.transformer.config)
        master = {name: tensor.to(dtype) for name, tensor in pipe.transformer.state_dict().items()}
        vae, clip, t5 = pipe.vae.to(dtype), pipe.text_encoder.to(dtype), pipe.text_encoder_2.to(dtype)
    else:
        config = TRANSFORMERS[model]
        master = random_master_weights(config, device, dtype)
        vae, clip, t5 = (build(device, dtype).cpu() for build in (random_vae, random_clip, random_t5))
    config_dir = write_transformer_config(folder, {k: v for k, v in config.items() if not k.startswith("_")})
    return FluxParts(config, master, vae, clip, t5, config_dir, dtype)


def plain_diffusers_image(pipe: FluxPipeline, job: RenderJob, steps: int) -> Any:
    """One image by a plain `pipe(prompt=...)` call, the way the diffusers docs and the seed article run it:
    the baseline rows' render, and the seed-recipe check's."""
    return pipe(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=steps,
        guidance_scale=job.guidance,
        max_sequence_length=job.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]
