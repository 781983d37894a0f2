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
