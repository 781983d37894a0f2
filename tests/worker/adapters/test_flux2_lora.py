"""LoRAs on FLUX.2 (issue 20, point 4): a peft LoRA for the tiny klein, read by Flux2KleinPipeline's own
loader, fuses into the weights at bf16 and renders as diffusers' peft layers do; at quantized levels it
stays within a fifth of the LoRA's effect of diffusers' LoRA render, less at higher levels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.shared.models import FluxFamily, FluxModel
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights, load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model
from tests.adapter_files import write_peft_lora

WEIGHT = 0.8
JOB = {
    "prompt": "a red fox in the snow",
    "model": "flux.2-klein-4b",
    "width": 256,
    "height": 256,
    "steps": 2,
    "seed": 5,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flux2-lora")


@pytest.fixture(scope="module")
def klein(files: Path) -> Path:
    return write_tiny_model(files / "klein", (QuantLevel.Q8_0, QuantLevel.Q4_K), model=FluxModel.FLUX_2_KLEIN_4B)


@pytest.fixture(scope="module")
def settings(files: Path) -> WorkerSettings:
    return WorkerSettings(cache_dir=files / "cache", job_file_roots=[str(files)])


@pytest.fixture(scope="module")
def lora(klein: Path, files: Path) -> Path:
    return write_peft_lora(klein, files / "style", pipeline=Flux2KleinPipeline, std=0.15)


def _job(lora: Path | None) -> RenderJob:
    return parse_job({**JOB, "loras": [] if lora is None else [{"source": str(lora), "weight": WEIGHT}]})


def _pixels(engine: RenderEngine, job: RenderJob) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(engine.render(job).png)).convert("RGB"), dtype=np.float64)


def _engine(klein: Path, level: QuantLevel, settings: WorkerSettings) -> RenderEngine:
    transformer = str(gguf_path(klein, level)) if level.is_gguf else None
    model = load_model(str(klein), transformer, "cpu", settings, level=level, flux_model=FluxModel.FLUX_2_KLEIN_4B)
    return RenderEngine(model, settings=settings)


@pytest.fixture(scope="module")
def reference(klein: Path, lora: Path, settings: WorkerSettings) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' own loader: peft LoRA layers beside the base weights; and the base render."""
    pipe = Flux2KleinPipeline.from_pretrained(klein, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(id="reference", transformer="reference", transformer_sha256="0" * 64)
    engine = RenderEngine(
        LoadedModel(
            pipe=pipe,
            weights=LoadedWeights.known(info),
            level=QuantLevel.BF16,
            device="cpu",
            family=FluxFamily.FLUX_2_KLEIN,
        ),
        settings=settings,
    )
    base = _pixels(engine, _job(None))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    pipe.set_adapters(["style"], [WEIGHT])
    engine.embeddings = type(engine.embeddings)(0)
    return _pixels(engine, _job(None)), base


def test_a_fused_flux2_lora_renders_as_diffusers_own_loader_does(
    klein: Path, lora: Path, settings: WorkerSettings, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    with_lora, base = reference
    engine = _engine(klein, QuantLevel.BF16, settings)
    fused = _pixels(engine, _job(lora))
    assert np.abs(with_lora - base).mean() > 1.0, "the LoRA changes the image"
    assert np.abs(fused - with_lora).max() <= 2, "the same image, up to float summation order"
    assert np.array_equal(_pixels(engine, _job(None)), base), "no LoRA: exactly the base weights again"


def test_quantized_flux2_levels_fuse_the_lora(
    klein: Path, lora: Path, settings: WorkerSettings, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    """The LoRA moves the tiny klein's pixels by ~3.7 levels; re-quantizing the fused rows costs Q8_0 ~1% of
    that, fp8 ~6% (its row scales follow the fused weights), Q4_K ~13%."""
    with_lora, base = reference
    effect = np.abs(with_lora - base).mean()
    errors = {}
    for level in (QuantLevel.Q8_0, QuantLevel.FP8, QuantLevel.Q4_K):
        engine = _engine(klein, level, settings)
        errors[level] = np.abs(_pixels(engine, _job(lora)) - with_lora).mean()
        base_error = np.abs(_pixels(engine, _job(None)) - base).mean()
        print(f"\n{level}: base error {base_error:.3f}, LoRA error {errors[level]:.3f}, LoRA effect {effect:.3f}")
    assert all(error < effect / 5 for error in errors.values()), "each render is the LoRA's, within a fifth of it"
    assert errors[QuantLevel.Q8_0] < errors[QuantLevel.Q4_K], "the error grows as the level drops"
