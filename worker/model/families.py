"""What differs between FLUX families when the engine renders: the pipeline and transformer classes, how
prompts become embeddings, what the denoising loop is given, and how its latents become pixels.

The engine (worker/render/engine.py) keeps the phases apart (encode once per prompt and cache it, denoise
a batch, decode each image) for every family; each family says here how its pipeline does each phase.
FLUX.1 encodes with CLIP (a pooled vector) and T5; FLUX.2 with one LLM, whose stacked hidden states are
the whole conditioning. FLUX.1's latent output is still packed and scaled, and so is FLUX.2 [dev]'s;
klein's is ready to decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.models import DEFAULT_IMG2IMG_STRENGTH, MODELS, FluxFamily, ImageUse


@dataclass(frozen=True)
class Embeddings:
    """One prompt's conditioning, kept on the host between jobs (the engine's cache)."""

    prompt: torch.Tensor
    pooled: torch.Tensor | None = None
    """FLUX.1's CLIP vector; FLUX.2 has none."""


@dataclass(frozen=True)
class FamilyOps:
    """How one family's pipeline runs each phase."""

    family: FluxFamily
    pipeline: type[DiffusionPipeline]
    transformer: type[torch.nn.Module]
    img2img: type[DiffusionPipeline] | None = None
    """The pipeline of the same parts that starts from a job's image (FLUX.1's img2img)."""

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.family in _TWO_ENCODERS else ("text_encoder",)

    def encode(self, pipe: Any, jobs: Sequence[RenderJob], device: torch.device, length: int) -> list[Embeddings]:
        """The embeddings of `jobs`' prompts, one forward of the encoders, rows on the host."""
        if self.family in _TWO_ENCODERS:
            prompt, pooled, _ = pipe.encode_prompt(
                prompt=[job.prompt for job in jobs],
                prompt_2=[job.prompt_2 or job.prompt for job in jobs],
                device=device,
                max_sequence_length=length,
            )
            return [Embeddings(prompt[row : row + 1].cpu(), pooled[row : row + 1].cpu()) for row in range(len(jobs))]
        prompt, _ = pipe.encode_prompt(prompt=[job.prompt for job in jobs], device=device, max_sequence_length=length)
        return [Embeddings(prompt[row : row + 1].cpu()) for row in range(len(jobs))]

    def image_arguments(self, jobs: Sequence[RenderJob], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """The denoising call's arguments for a batch's input images (`images[row]`: that job's, read)."""
        first = jobs[0]
        if not first.images:
            return {}
        use = MODELS[first.model].image_use
        if use == ImageUse.REFERENCES:  # the pipeline repeats one set of references over the batch (grouped so)
            return {"image": list(images[0])}
        at_size = [read[0].resize((job.width, job.height)) for job, read in zip(jobs, images, strict=True)]
        if use == ImageUse.EDIT:  # Kontext's output at the job's size: its own sizing off
            return {"image": at_size, "_auto_resize": False, "max_area": first.width * first.height}
        return {"image": at_size, "strength": first.strength or DEFAULT_IMG2IMG_STRENGTH}

    def conditioning(self, embeddings: Sequence[Embeddings], device: str) -> dict[str, torch.Tensor]:
        """The denoising call's conditioning arguments for a batch."""
        found = {"prompt_embeds": torch.cat([e.prompt for e in embeddings]).to(device)}
        pooled = [e.pooled for e in embeddings if e.pooled is not None]
        if pooled:
            found["pooled_prompt_embeds"] = torch.cat(pooled).to(device)
        return found

    def decode(self, pipe: Any, latents: torch.Tensor, job: RenderJob) -> Image.Image:
        """One image from its row of the denoising call's latent output."""
        vae = pipe.vae
        if self.family in _TWO_ENCODERS:
            latents = pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor)
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        elif self.family == FluxFamily.FLUX_2:
            latents = _flux2_dev_latents(pipe, latents, job)
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
        return images[0]


def _flux2_dev_latents(pipe: Any, latents: torch.Tensor, job: RenderJob) -> torch.Tensor:
    """Flux2Pipeline's latent output is still packed and normalized (klein's is not): what its own decode
    does first, for the job's size."""
    side = pipe.vae_scale_factor * 2
    grid = torch.zeros(latents.shape[0], 1, job.height // side, job.width // side)
    latents = pipe._unpack_latents_with_ids(latents, pipe._prepare_latent_ids(grid).to(latents.device))
    norm = pipe.vae.bn
    mean = norm.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(norm.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return pipe._unpatchify_latents(latents * std.to(latents.device, latents.dtype) + mean)


_TWO_ENCODERS = (FluxFamily.FLUX_1, FluxFamily.FLUX_1_KONTEXT)
_FLUX1_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


def flux1_pipeline_over(pipe: Any, pipeline_class: type[DiffusionPipeline], **extra: Any) -> Any:
    """Another FLUX.1 pipeline (img2img, ControlNet) over a loaded pipeline's parts as they are: diffusers'
    from_pipe would cast them, which a quantized transformer refuses."""
    built = pipeline_class(**{name: getattr(pipe, name) for name in _FLUX1_PARTS}, **extra)
    built.set_progress_bar_config(disable=True)
    return built


FAMILIES: dict[FluxFamily, FamilyOps] = {
    FluxFamily.FLUX_1: FamilyOps(FluxFamily.FLUX_1, FluxPipeline, FluxTransformer2DModel, FluxImg2ImgPipeline),
    FluxFamily.FLUX_1_KONTEXT: FamilyOps(FluxFamily.FLUX_1_KONTEXT, FluxKontextPipeline, FluxTransformer2DModel),
    FluxFamily.FLUX_2: FamilyOps(FluxFamily.FLUX_2, Flux2Pipeline, Flux2Transformer2DModel),
    FluxFamily.FLUX_2_KLEIN: FamilyOps(FluxFamily.FLUX_2_KLEIN, Flux2KleinPipeline, Flux2Transformer2DModel),
}
