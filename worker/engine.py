"""The render loop: one job in, PNG bytes and phase timings out.

Encode, denoise and decode run as separate phases (the pipeline's own steps, called in turn), so
each is timed on its own and later work can cache embeddings or batch the denoise.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image, PngImagePlugin

from shared.jobs import RenderJob
from worker.gpu import synchronize
from worker.pipeline import LoadedModel


@dataclass(frozen=True)
class RenderedImage:
    png: bytes
    width: int
    height: int
    encode_s: float
    denoise_s: float
    decode_s: float


class _PhaseClock:
    """Seconds per phase, with the GPU drained at each boundary."""

    def __init__(self, device: str) -> None:
        self._device = device
        self._last = time.perf_counter()

    def lap(self) -> float:
        synchronize(self._device)
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def encode_png(image: Image.Image, job: RenderJob) -> bytes:
    """PNG with the job's parameters in a text chunk, so a file on its own still says what it is."""
    info = PngImagePlugin.PngInfo()
    info.add_text("fluxfarm-job", json.dumps(job.model_dump(mode="json"), ensure_ascii=False), zip=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class RenderEngine:
    """Renders jobs with one loaded pipeline; holds no per-job state."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    @contextmanager
    def _encoders_on_gpu(self) -> Iterator[None]:
        """For a gpu-swap plan: the transformer waits in host memory while the encoders use the GPU."""
        if self.model.text_encoders != "gpu-swap":
            yield
            return
        pipe, device = self.model.pipe, self.model.device
        pipe.transformer.to("cpu")
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        try:
            yield
        finally:
            pipe.text_encoder.to("cpu")
            pipe.text_encoder_2.to("cpu")
            pipe.transformer.to(device)

    @torch.inference_mode()
    def render(self, job: RenderJob) -> RenderedImage:
        pipe = self.model.pipe
        device = self.model.device
        clock = _PhaseClock(device)
        with self._encoders_on_gpu():
            prompt_embeds, pooled_embeds, _ = pipe.encode_prompt(
                prompt=job.prompt,
                prompt_2=job.prompt_2,
                device=torch.device(device),
                max_sequence_length=job.max_sequence_length,
            )
        encode_s = clock.lap()
        # A CPU generator gives the same starting noise for a seed on every card.
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        latents = pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_embeds,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            max_sequence_length=job.max_sequence_length,
            generator=generator,
            output_type="latent",
        ).images
        denoise_s = clock.lap()
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        decode_s = clock.lap()
        return RenderedImage(
            png=encode_png(image, job),
            width=image.width,
            height=image.height,
            encode_s=encode_s,
            denoise_s=denoise_s,
            decode_s=decode_s,
        )
