"""What a worker loads: the catalog, forced levels, the operator's file, and fp8's scaled weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import FarmError
from shared.jobs import parse_job
from shared.ladder import QuantLevel
from shared.settings import FarmSettings
from worker.catalog import available_levels, built_in_catalog, load_catalog, model_family
from worker.engine import RenderEngine
from worker.loadout import choose_loadout
from worker.pipeline import load_model
from worker.tiny_model import gguf_path

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


def test_built_in_catalog_names_city96_files_for_every_gguf_level() -> None:
    dev = built_in_catalog()[FLUX_DEV]
    assert dev[QuantLevel.Q8_0] == "hf://city96/FLUX.1-dev-gguf/flux1-dev-Q8_0.gguf"
    assert dev[QuantLevel.Q4_K] == "hf://city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf"
    assert {level for level in QuantLevel if level.is_gguf} == set(dev)
    assert model_family("black-forest-labs/FLUX.1-schnell") == "flux.1-schnell"


def test_a_toml_catalog_overrides_and_adds_levels(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(
        f'[models."{FLUX_DEV}"]\nQ8_0 = "s3://models/dev-q8.gguf"\n[models."my/finetune"]\nq4_k = "/m/ft.gguf"\n'
    )
    catalog = load_catalog(override)
    assert catalog[FLUX_DEV][QuantLevel.Q8_0] == "s3://models/dev-q8.gguf"
    assert catalog[FLUX_DEV][QuantLevel.Q6_K].startswith("hf://city96/")
    assert available_levels(catalog, "my/finetune") == [QuantLevel.BF16, QuantLevel.FP8, QuantLevel.Q4_K]
    override.write_text("[models.broken\n")
    with pytest.raises(FarmError, match="cannot read model catalog"):
        load_catalog(override)


def test_a_forced_level_comes_from_the_catalog(tiny_model: Path, tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(f'[models."{tiny_model}"]\nQ4_0 = "{gguf_path(tiny_model, QuantLevel.Q4_0)}"\n')
    settings = FarmSettings(cache_dir=tmp_path / "cache", catalog=override, quant="Q4_0")
    loadout = choose_loadout(settings, str(tiny_model), None, "cpu")
    assert (loadout.level, loadout.transformer) == (QuantLevel.Q4_0, str(gguf_path(tiny_model, QuantLevel.Q4_0)))
    with pytest.raises(FarmError, match="no weights for Q6_K"):
        choose_loadout(settings.model_copy(update={"quant": "Q6_K"}), str(tiny_model), None, "cpu")


def test_the_operators_file_decides_the_level_and_a_contradicting_quant_fails(tiny_model: Path, tmp_path: Path) -> None:
    q8 = str(gguf_path(tiny_model, QuantLevel.Q8_0))
    settings = FarmSettings(cache_dir=tmp_path / "cache")
    assert choose_loadout(settings, str(tiny_model), q8, "cpu").level == QuantLevel.Q8_0
    with pytest.raises(FarmError, match=r"--quant Q4_0 asked for, but the transformer file .* holds Q8_0"):
        choose_loadout(settings.model_copy(update={"quant": "Q4_0"}), str(tiny_model), q8, "cpu")
    assert choose_loadout(settings, str(tiny_model), None, "cpu").level == QuantLevel.BF16


def _pixels(engine: RenderEngine) -> np.ndarray:
    rendered = engine.render(parse_job({"prompt": "a red fox", "width": 256, "height": 256, "steps": 3, "seed": 5}))
    return np.asarray(Image.open(io.BytesIO(rendered.png)).convert("RGB"), dtype=np.float64)


def test_fp8_keeps_scaled_e4m3_weights_and_renders_between_q8_0_and_q4_k(tiny_model: Path, tmp_path: Path) -> None:
    settings = FarmSettings(cache_dir=tmp_path / "cache")
    reference = _pixels(RenderEngine(load_model(str(tiny_model), None, "cpu", settings)))
    fp8 = load_model(str(tiny_model), None, "cpu", settings, fp8=True)
    assert fp8.quant == "fp8"
    dtypes = {name: p.dtype for name, p in fp8.pipe.transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.ff.net.2.weight"].itemsize == 1
    assert dtypes["x_embedder.weight"].itemsize == 4, "embedders keep full precision"
    error = {
        "fp8": np.abs(_pixels(RenderEngine(fp8)) - reference).mean(),
        **{
            level.value: np.abs(
                _pixels(RenderEngine(load_model(str(tiny_model), str(gguf_path(tiny_model, level)), "cpu", settings)))
                - reference
            ).mean()
            for level in (QuantLevel.Q8_0, QuantLevel.Q4_K)
        },
    }
    print("\nmean absolute pixel error vs bf16:", error)
    assert error["Q8_0"] < error["fp8"] < error["Q4_K"], error
