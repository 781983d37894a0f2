"""`fluxfarm random-model` (worker/tools/random_model.py): a random-weight pipeline written as a diffusers folder
that a worker loads with `--model DIR` and renders from, with GGUF files beside it and a catalog naming them;
full size needs a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.model.catalog import load_catalog
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import CATALOG_FILE, gguf_path
from tests.conftest import run_fluxfarm


@pytest.mark.parametrize("model", [FluxModel.FLUX_1_DEV, FluxModel.FLUX_2_KLEIN_4B])
def test_the_written_pipeline_loads_and_renders_at_bf16_and_from_its_gguf(model: FluxModel, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_fluxfarm(
        "random-model", str(out), "--model", model.value, "--levels", "Q4_K", "--device", "cpu", "--tiny"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    marker = json.loads((out / "fluxfarm-tiny-model.json").read_text())
    assert (marker["model"], marker["size"], marker["levels"], marker["renders"]) == (
        model.value,
        "tiny",
        ["Q4_K"],
        "noise",
    )
    catalog = load_catalog(out / CATALOG_FILE)[str(out.resolve())]
    assert {level: entry.source for level, entry in catalog.items()} == {
        QuantLevel.Q4_K: str(gguf_path(out.resolve(), QuantLevel.Q4_K))
    }
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    job = parse_job({"prompt": "a lighthouse", "model": model.value, "width": 256, "height": 256, "steps": 2})
    for level, transformer in ((QuantLevel.BF16, None), (QuantLevel.Q4_K, str(gguf_path(out, QuantLevel.Q4_K)))):
        loaded = load_model(str(out), transformer, "cpu", settings, level=level, flux_model=model)
        assert loaded.level == level
        assert RenderEngine(loaded, settings=settings).render(job).png.startswith(b"\x89PNG")


def test_full_size_is_refused_without_a_gpu(tmp_path: Path) -> None:
    result = run_fluxfarm("random-model", str(tmp_path / "model"), "--device", "cpu")
    assert result.returncode != 0
    assert "CUDA GPU" in result.stderr and "--tiny" in result.stderr
    assert not (tmp_path / "model").exists()
