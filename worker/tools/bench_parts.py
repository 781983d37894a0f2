"""The random-weight model every bench configuration shares, of any family: full size on a GPU (the same bytes
and FLOPs as trained weights), the family's tiny pipeline on a CPU. Transformer weights are drawn per tensor
from seeds (worker/tools/random_weights.py); the text encoders and VAE are built once and kept on the host.

FLUX.2's text encoder is built trimmed to the layers its pipeline reads, as a worker keeps it, for the
diffusers baselines too: they run the same encoder, so a baseline's encode costs no more than ours.
"""

from __future__ import annotations

import functools
import gc
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import random_flux2_vae, random_text_encoder, transformer_config
from fluxfarm.worker.model.flux_arch import random_clip, random_t5, random_vae
from fluxfarm.worker.model.model_sizes import EncoderPrecision
from fluxfarm.worker.model.pipeline import compute_dtype
from fluxfarm.worker.model.text_encoders import prepare_text_encoder
from fluxfarm.worker.tools.bnb_nf4 import to_bnb_nf4
from fluxfarm.worker.tools.random_weights import SeededWeights
from fluxfarm.worker.tools.tiny_flux2 import mistral_tokenizer, qwen_tokenizer
from fluxfarm.worker.tools.tiny_model import build_tiny, clip_tokenizer, t5_tokenizer
from fluxfarm.worker.tools.tiny_parts import flux_scheduler

BENCH_MODELS = (
    FluxModel.FLUX_1_DEV,
    FluxModel.FLUX_1_SCHNELL,
    FluxModel.FLUX_2_DEV,
    FluxModel.FLUX_2_KLEIN_4B,
    FluxModel.FLUX_2_KLEIN_9B,
)
_KEPT_STATES = 2
"""GGUF levels kept quantized in host memory at once (FLUX.2 [dev]'s are 10-32 GiB each)."""


@dataclass
class FluxParts:
    """The random-weight components every configuration shares (host memory between runs)."""

    model: FluxModel
    weights: SeededWeights
    components: dict[str, Any]
    """The pipeline's other parts: VAE, text encoder(s) and tokenizer(s), on the host. FLUX.2's bf16 text encoder
    may be left out (`release_bf16_encoder`) and drawn again when asked for."""
    device: str
    draw_encoder: Callable[[], torch.nn.Module] | None = None
    """FLUX.2's bf16 text encoder drawn anew on the device (same seed, same weights): what its other precisions are
    made from, so no host copy of FLUX.2 [dev]'s 32 GiB is ever made for them; None for FLUX.1."""
    states: OrderedDict[QuantLevel, dict[str, torch.Tensor]] = field(default_factory=OrderedDict)
    encoders: dict[EncoderPrecision, torch.nn.Module] = field(default_factory=dict)

    @property
    def family(self) -> FluxFamily:
        return MODELS[self.model].family

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def transformer_config(self) -> dict[str, Any]:
        return self.weights.config

    @property
    def master(self) -> dict[str, torch.Tensor]:
        return self.weights.master(self.device)

    def state(self, level: QuantLevel, device: str) -> dict[str, torch.Tensor] | None:
        """A GGUF level's host-memory weights, quantized once (the quantizer's cost, not the worker's)."""
        if not level.is_gguf:
            return None
        if level not in self.states:
            while len(self.states) >= _KEPT_STATES:
                self.states.popitem(last=False)
            self.states[level] = self.weights.gguf_state(level, device)
        self.states.move_to_end(level)
        return self.states[level]

    def transformer(self, level: QuantLevel, device: str) -> torch.nn.Module:
        """The transformer at `level` on `device` (GGUF levels through diffusers' own loader)."""
        return self.weights.transformer(level, device, self.state(level, device))

    def text_encoder(self, precision: EncoderPrecision) -> torch.nn.Module:
        """FLUX.2's encoder at `precision`, on the host: bf16 as drawn (again, if it was released), others made
        once from a fresh draw on the device, in the worker's format (on the host FLUX.2 [dev]'s 17B parameters
        take minutes; a host copy of its bf16 encoder to quantize is 32 GiB more, and the host ran out of memory
        with one, runs 11 and 13). Call it before a memory cap: both are drawn on the device."""
        assert self.draw_encoder is not None, "FLUX.2's encoders only"
        if precision == "bf16":
            if "text_encoder" not in self.components:
                self.components["text_encoder"] = self.draw_encoder().cpu()
            return self.components["text_encoder"]
        if precision not in self.encoders:
            drawn = self.draw_encoder()
            self.encoders[precision] = prepare_text_encoder(drawn, self.family, precision, self.dtype).cpu()
        return self.encoders[precision]

    def release_bf16_encoder(self) -> None:
        """Drop FLUX.2's bf16 encoder from host memory until a configuration asks for it again: FLUX.2 [dev]'s is
        32 GiB, which a plan with an fp8 or Q4_K encoder does not use, and beside that plan's pinned copies the
        host (125 GiB on the H200 machine) ran out of memory (runs 11 and 13)."""
        if self.draw_encoder is not None and self.components.pop("text_encoder", None) is not None:
            gc.collect()

    def pipeline(
        self,
        transformer: torch.nn.Module | None,
        precision: EncoderPrecision = "bf16",
        text_encoder: torch.nn.Module | None = None,
    ) -> Any:
        """The family's pipeline around `transformer`, its text encoder at `precision` (or `text_encoder`)."""
        parts = dict(self.components)
        if text_encoder is not None:
            parts["text_encoder"] = text_encoder
        elif self.family != FluxFamily.FLUX_1:
            parts["text_encoder"] = self.text_encoder(precision)
        return assemble_pipeline(self.family, transformer, parts)

    def four_bit_pipeline(self) -> Any:
        """The pipeline with bitsandbytes NF4 copies of the transformer and the text encoder, on the host
        (worker/tools/bnb_nf4.py), both quantized from fresh draws on the device. The quantized copies kept for
        other runs and the bf16 encoder go first: FLUX.2 [dev]'s need that host memory."""
        assert self.draw_encoder is not None, "FLUX.2's recipe only"
        self.states.clear()
        self.encoders.clear()
        self.release_bf16_encoder()
        gc.collect()
        transformer = to_bnb_nf4(self.transformer(QuantLevel.BF16, self.device), self.device, self.dtype).cpu()
        encoder = to_bnb_nf4(self.draw_encoder(), self.device, self.dtype).cpu()
        return self.pipeline(transformer, text_encoder=encoder)


def assemble_pipeline(family: FluxFamily, transformer: torch.nn.Module | None, parts: dict[str, Any]) -> Any:
    """The family's diffusers pipeline from its parts, with the scheduler every FLUX model ships."""
    extra = {"is_distilled": True} if family == FluxFamily.FLUX_2_KLEIN else {}
    pipeline_class: type[DiffusionPipeline] = FAMILIES[family].pipeline
    return pipeline_class(scheduler=flux_scheduler(), transformer=transformer, **parts, **extra)


ENCODER_SEED = 0
"""FLUX.2's random text encoder is drawn from this seed, each time the same weights."""


def full_size_encoder(model: FluxModel, device: str, dtype: torch.dtype, trimmed: bool = True) -> torch.nn.Module:
    """FLUX.2's text encoder, random and full size, drawn on `device` from ENCODER_SEED and left there."""
    torch.manual_seed(ENCODER_SEED)
    return random_text_encoder(model, device, dtype, trimmed)


def tiny_encoder(model: FluxModel, dtype: torch.dtype) -> torch.nn.Module:
    """The text encoder of `model`'s tiny pipeline (the same weights each call), as a worker keeps it, on the
    host (the tiny pipelines' device)."""
    encoder = build_tiny(model).text_encoder.to(dtype)
    return prepare_text_encoder(encoder, MODELS[model].family, "bf16", dtype)


def full_size_components(model: FluxModel, device: str, dtype: torch.dtype, trimmed: bool = True) -> dict[str, Any]:
    """The pipeline's parts other than the transformer, random and full size, on the host; FLUX.2's text
    encoder trimmed as a worker keeps it, or whole as a checkpoint holds it."""
    if MODELS[model].family == FluxFamily.FLUX_1:
        return {
            "vae": random_vae(device, dtype).cpu(),
            "text_encoder": random_clip(device, dtype).cpu(),
            "tokenizer": clip_tokenizer(),
            "text_encoder_2": random_t5(device, dtype).cpu(),
            "tokenizer_2": t5_tokenizer(),
        }
    tokenizer = mistral_tokenizer() if model == FluxModel.FLUX_2_DEV else qwen_tokenizer()
    encoder = full_size_encoder(model, device, dtype, trimmed).cpu()
    return {"vae": random_flux2_vae(device, dtype).cpu(), "text_encoder": encoder, "tokenizer": tokenizer}


def build_parts(model: str, device: str, folder: Path, tiny: bool = False) -> FluxParts:
    """Full-size random `model` (weights drawn on `device`, kept on the host) or, `tiny` (or model "tiny",
    FLUX.1's), the family's tiny pipeline."""
    dtype = compute_dtype(device)
    torch.manual_seed(0)
    flux_model = FluxModel.FLUX_1_DEV if model == "tiny" else FluxModel(model)
    if tiny or model == "tiny":
        pipe = build_tiny(flux_model)
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        components = {
            name: part.to(dtype) if isinstance(part, torch.nn.Module) else part
            for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
            if (part := getattr(pipe, name, None)) is not None
        }
        family = MODELS[flux_model].family
        components["text_encoder"] = prepare_text_encoder(components["text_encoder"], family, "bf16", dtype)
        draw = functools.partial(tiny_encoder, flux_model, dtype)
    else:
        config = transformer_config(flux_model)
        components = full_size_components(flux_model, device, dtype)
        draw = functools.partial(full_size_encoder, flux_model, device, dtype)
    flux2 = MODELS[flux_model].family != FluxFamily.FLUX_1
    return FluxParts(flux_model, SeededWeights(config, dtype, folder), components, device, draw if flux2 else None)


def plain_diffusers_image(pipe: Any, job: RenderJob, steps: int, **inputs: Any) -> Any:
    """One image by a plain `pipe(prompt=...)` call, the way the diffusers docs and the seed article run it:
    the baseline rows' render, the seed-recipe check's, and the tests' reference (`inputs`: its images)."""
    return pipe(
        **inputs,
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=steps,
        guidance_scale=job.guidance,
        max_sequence_length=job.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]
