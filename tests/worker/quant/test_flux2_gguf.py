"""Every GGUF level for FLUX.2 transformers (issue 20, acceptance 3): `fluxfarm quantize` and the writer
behind it write a tiny FLUX.2 [klein] and a tiny FLUX.2 [dev]-shaped transformer (guidance embedded) at
each level of the ladder; diffusers' own Flux2Transformer2DModel loads every file, and the weights'
error grows as the levels drop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.quant.gguf.writer import QUANTIZABLE_LEVELS, gguf_level, write_gguf
from fluxfarm.worker.tools.tiny_model import write_tiny_model
from tests.conftest import load_gguf_transformer

FLUX2 = Flux2Transformer2DModel

CHAINS = [
    (QuantLevel.Q8_0, QuantLevel.Q6_K, QuantLevel.Q5_K, QuantLevel.Q4_K, QuantLevel.Q3_K, QuantLevel.Q2_K),
    (QuantLevel.Q8_0, QuantLevel.Q5_1, QuantLevel.Q4_1),
    (QuantLevel.Q8_0, QuantLevel.Q5_0, QuantLevel.Q4_0),
]
"""Levels in order of fewer bits, where each must lose more than the one before."""


@pytest.fixture(scope="module", params=["klein", "dev"])
def transformer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder whose `transformer/` is a tiny FLUX.2 transformer of that variant."""
    folder = write_tiny_model(tmp_path_factory.mktemp("flux2") / "tiny", model=FluxModel.FLUX_2_KLEIN_4B)
    if request.param == "dev":  # FLUX.2 [dev] embeds its guidance; klein is distilled without it
        klein = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer")
        torch.manual_seed(1)
        Flux2Transformer2DModel.from_config({**klein.config, "guidance_embeds": True}).save_pretrained(
            folder / "transformer"
        )
    return folder


def _relative_rms(loaded: torch.nn.Module, reference: torch.nn.Module) -> float:
    """The largest relative RMS error over the transformer's quantized weight matrices."""
    worst = 0.0
    found = dict(loaded.named_parameters())
    for name, exact in reference.named_parameters():
        value = found[name]
        if not isinstance(value, GGUFParameter) or value.quant_type in (0, 1):  # F32, F16 are kept as they were
            continue
        approx = dequantize_gguf_tensor(value.detach()).float().reshape(exact.shape)
        wanted = exact.detach().float()
        error = (approx - wanted).pow(2).mean().sqrt() / wanted.pow(2).mean().sqrt()
        worst = max(worst, float(error))
    return worst


def test_every_level_round_trips_through_diffusers_and_errors_grow_as_levels_drop(
    transformer_dir: Path, tmp_path: Path
) -> None:
    reference = Flux2Transformer2DModel.from_pretrained(transformer_dir, subfolder="transformer")
    # The command line, once per variant; the writer it calls, for the other levels.
    out = tmp_path / "Q4_K.gguf"
    command = [
        "quantize",
        str(transformer_dir / "transformer"),
        "--level",
        "Q4_K",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "fluxfarm", *command],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    errors = {QuantLevel.Q4_K: _relative_rms(load_gguf_transformer(out, transformer_dir, FLUX2), reference)}
    state = reference.state_dict()
    for level in QUANTIZABLE_LEVELS:
        if level in errors:
            continue
        path = tmp_path / f"{level.value}.gguf"
        write_gguf(state, level, path)
        assert gguf_level(path) == level.value
        errors[level] = _relative_rms(load_gguf_transformer(path, transformer_dir, FLUX2), reference)
    assert 0 < errors[QuantLevel.Q8_0] < 0.01, errors
    for chain in CHAINS:
        losses = [errors[level] for level in chain]
        assert losses == sorted(losses), {level.value: round(errors[level], 4) for level in chain}
