"""The offline tiny FLUX.2 [klein] (issue 20, point 5): written by `fluxfarm tiny-model --model`, loaded by
diffusers' own Flux2KleinPipeline from the folder, its tokenizer with Qwen's chat template, and
deterministic renders: the same seed gives the same pixels, another seed others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

from fluxfarm.worker.tools.tiny_flux2 import KLEIN_TEXT_LAYERS


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("klein") / "tiny-klein"
    done = subprocess.run(
        [sys.executable, "-m", "fluxfarm", "tiny-model", str(out), "--model", "flux.2-klein-4b", "--levels", ""],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "tiny flux.2-klein-4b pipeline (renders noise)" in done.stdout
    return out


def _render(pipe: Flux2KleinPipeline, seed: int) -> np.ndarray:
    out = pipe(
        prompt="a red fox in the snow",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_the_tiny_klein_folder_is_a_flux2_klein_pipeline_that_renders_deterministically(klein_dir: Path) -> None:
    marker = json.loads((klein_dir / "fluxfarm-tiny-model.json").read_text())
    assert marker["model"] == "flux.2-klein-4b" and marker["renders"] == "noise"
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
    assert type(pipe.text_encoder).__name__ == "Qwen3ForCausalLM"
    assert pipe.text_encoder.config.num_hidden_layers == KLEIN_TEXT_LAYERS
    assert pipe.config.is_distilled
    chat = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a fox"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"
    first, again, other = _render(pipe, 7), _render(pipe, 7), _render(pipe, 8)
    assert first.shape == (256, 256, 3) and np.isfinite(first).all()
    assert np.array_equal(first, again), "same seed, same pixels"
    assert not np.array_equal(first, other), "another seed, other pixels"


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_tiny_flux2_dev_folder_renders_through_the_worker_with_its_encoder_trimmed(
    tmp_path: Path, precision: str
) -> None:
    """FLUX.2 [dev]'s family: a Mistral3 encoder behind its chat template, loaded by the worker trimmed to the
    30 layers the pipeline reads (and in fp8 where the plan says so), rendering a job through the engine."""
    from fluxfarm.shared.jobs import parse_job
    from fluxfarm.shared.models import FluxModel
    from fluxfarm.worker.model.pipeline import load_model
    from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear
    from fluxfarm.worker.render.engine import RenderEngine
    from fluxfarm.worker.settings import WorkerSettings
    from fluxfarm.worker.tools.tiny_model import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny-flux2-dev", model=FluxModel.FLUX_2_DEV)
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    loaded = load_model(
        str(folder), None, "cpu", settings, flux_model=FluxModel.FLUX_2_DEV, text_encoder_precision=precision
    )
    encoder = loaded.pipe.text_encoder
    assert type(loaded.pipe).__name__ == "Flux2Pipeline"
    assert len(encoder.model.language_model.layers) == 30 and encoder.model.vision_tower is None
    fp8_layers = [m for m in encoder.modules() if isinstance(m, ScaledFp8Linear)]
    assert bool(fp8_layers) == (precision == "fp8")
    job = parse_job({"prompt": "a red kite", "model": "flux.2-dev", "width": 256, "height": 256, "steps": 2})
    rendered = RenderEngine(loaded, settings=settings).render(job)
    assert (rendered.width, rendered.height) == (256, 256)
    # The engine's phases (encode, denoise to latents, its own unpack and decode) give the pipeline's pixels.
    from fluxfarm.worker.tools.bench_parts import plain_diffusers_image

    plain = np.asarray(plain_diffusers_image(loaded.pipe, job, job.steps), dtype=np.float64)
    assert np.abs(np.asarray(rendered.image, dtype=np.float64) - plain).max() <= 1
