"""The offline tiny FLUX: real diffusers classes, GGUF files diffusers loads, deterministic renders."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

from fluxfarm.shared.errors import FarmError, ModelLoadError
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.quant.gguf.writer import gguf_level, write_gguf
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.conftest import load_gguf_transformer

# Relative RMS error of the dequantized weights; Q4_0 keeps 4 bits per weight, Q8_0 eight.
MAX_RELATIVE_RMS = {QuantLevel.Q8_0: 0.01, QuantLevel.Q4_0: 0.15}


def _relative_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).pow(2).mean().sqrt() / exact.float().pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> WorkerSettings:
    return WorkerSettings(cache_dir=tmp_path_factory.mktemp("cache"))


def test_tiny_model_is_a_diffusers_flux_pipeline(tiny_model: Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_model)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    ids = pipe.tokenizer("a red fox", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    t5_ids = pipe.tokenizer_2("a red fox").input_ids
    assert t5_ids[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.unk_token_id not in t5_ids


@pytest.mark.parametrize("level", [QuantLevel.Q8_0, QuantLevel.Q4_0])
def test_gguf_files_load_with_from_single_file_and_match_the_weights(tiny_model: Path, level: QuantLevel) -> None:
    path = gguf_path(tiny_model, level)
    assert gguf_level(path) == level.value
    reference = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").state_dict()
    quantized = load_gguf_transformer(path, tiny_model)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    errors = {}
    for name, param in quantized.state_dict().items():
        errors[name] = _relative_rms(dequantize_gguf_tensor(param), reference[name])
    quantized_names = [n for n, p in quantized.state_dict().items() if hasattr(p, "quant_type")]
    assert quantized_names, "some weights must actually be quantized"
    assert max(errors[n] for n in quantized_names) < MAX_RELATIVE_RMS[level]
    kept = [n for n in errors if n not in quantized_names]
    assert any(n.startswith("x_embedder.") for n in kept), "embedders keep higher precision"
    assert max(errors[n] for n in kept) < 1e-3


def test_write_gguf_refuses_levels_it_cannot_make(tmp_path: Path) -> None:
    with pytest.raises(FarmError, match="cannot quantize to bf16"):
        write_gguf({"w": torch.zeros(32, 32)}, QuantLevel.BF16, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_gguf_file_keeps_diffusers_tensor_names(tiny_model: Path) -> None:
    reader = gguf.GGUFReader(str(gguf_path(tiny_model, QuantLevel.Q8_0)))
    names = {tensor.name for tensor in reader.tensors}
    reference = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").state_dict()
    assert names == set(reference)


def _render(engine: RenderEngine, **job: object) -> tuple[str, np.ndarray]:
    rendered = engine.render(parse_job({"prompt": "a red fox", "width": 256, "height": 256, "steps": 3, **job}))
    pixels = np.asarray(Image.open(io.BytesIO(rendered.png)).convert("RGB"), dtype=np.float64)
    return hashlib.sha256(pixels.tobytes()).hexdigest(), pixels


RENDER_CHAIN = (QuantLevel.Q8_0, QuantLevel.Q6_K, QuantLevel.Q5_K, QuantLevel.Q4_K, QuantLevel.Q3_K, QuantLevel.Q2_K)


def test_renders_are_deterministic_per_seed_and_quantization_error_grows_as_the_level_drops(
    tiny_model: Path, settings: WorkerSettings
) -> None:
    bf16 = RenderEngine(load_model(str(tiny_model), None, "cpu", settings))
    digest, reference = _render(bf16, seed=5)
    assert _render(bf16, seed=5)[0] == digest
    assert _render(bf16, seed=6)[0] != digest
    error = {}
    for level in RENDER_CHAIN:
        engine = RenderEngine(load_model(str(tiny_model), str(gguf_path(tiny_model, level)), "cpu", settings))
        assert engine.model.level == level
        error[level.value] = float(np.abs(_render(engine, seed=5)[1] - reference).mean())
    print("\nmean absolute pixel error vs bf16:", error)
    values = list(error.values())
    assert values[0] > 0, "a quantized transformer renders a different image"
    assert values == sorted(values) and len(set(values)) == len(values), error


def test_load_model_fails_clearly_on_bad_sources(tiny_model: Path, settings: WorkerSettings, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_model(str(tmp_path), None, "cpu", settings)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tiny_model), str(tmp_path / "missing.gguf"), "cpu", settings)
    with pytest.raises(ModelLoadError, match=r"only huggingface\.co URLs"):
        load_model(str(tiny_model), "https://example.com/model.gguf", "cpu", settings)
