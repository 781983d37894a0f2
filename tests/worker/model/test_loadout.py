"""What a worker loads: the catalog, forced levels, the operator's file, and fp8's scaled weights."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxfarm.shared.errors import FarmError, ModelLoadError
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.catalog import CatalogEntry, available_levels, built_in_catalog, load_catalog, nf4_installed
from fluxfarm.worker.model.loadout import choose_loadout
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.model.sources import model_cache, resolve_file
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.conftest import S3Server

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


def test_built_in_catalog_names_the_published_gguf_files() -> None:
    dev = built_in_catalog()[FLUX_DEV]
    assert dev[QuantLevel.Q8_0].source == "hf://city96/FLUX.1-dev-gguf/flux1-dev-Q8_0.gguf"
    assert dev[QuantLevel.Q4_K].source == "hf://city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf"
    assert {level for level in QuantLevel if level.is_gguf} == set(dev)
    flux2 = built_in_catalog()["black-forest-labs/FLUX.2-dev"]
    assert flux2[QuantLevel.Q5_K].source == "hf://city96/FLUX.2-dev-gguf/flux2-dev-Q5_K_S.gguf"
    klein_9b = built_in_catalog()["black-forest-labs/FLUX.2-klein-9B"]
    assert klein_9b[QuantLevel.Q4_K].source == "hf://unsloth/FLUX.2-klein-9B-GGUF/flux-2-klein-9b-Q4_K_M.gguf"
    assert set(klein_9b) == {QuantLevel.Q8_0, QuantLevel.Q5_0, QuantLevel.Q4_K}
    assert "black-forest-labs/FLUX.2-klein-4B" not in built_in_catalog()  # no published names seen yet


def test_a_toml_catalog_overrides_and_adds_levels(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(
        f'[models."{FLUX_DEV}"]\n'
        'Q8_0 = { source = "s3://models/dev-q8.gguf", sha256 = "ABC123" }\n'
        '[models."my/finetune"]\n'
        'q4_k = "/m/ft.gguf"\n'
    )
    catalog = load_catalog(override)
    assert catalog[FLUX_DEV][QuantLevel.Q8_0] == CatalogEntry("s3://models/dev-q8.gguf", "abc123")
    assert catalog[FLUX_DEV][QuantLevel.Q6_K].source.startswith("hf://city96/")
    nf4 = [QuantLevel.NF4] if nf4_installed() else []  # made at load by bitsandbytes, where it is installed
    assert available_levels(catalog, "my/finetune") == [QuantLevel.BF16, QuantLevel.FP8, *nf4, QuantLevel.Q4_K]
    override.write_text("[models.broken\n")
    with pytest.raises(FarmError, match="cannot read model catalog"):
        load_catalog(override)
    override.write_text(f'[models."{FLUX_DEV}"]\nQ8_0 = 3\n')
    with pytest.raises(FarmError, match="must be a source string"):
        load_catalog(override)


def test_a_forced_level_comes_from_the_catalog(tiny_model: Path, tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(f'[models."{tiny_model}"]\nQ4_0 = "{gguf_path(tiny_model, QuantLevel.Q4_0)}"\n')
    settings = WorkerSettings(cache_dir=tmp_path / "cache", catalog=override, level="Q4_0")
    loadout = choose_loadout(settings, str(tiny_model), None, "cpu")
    assert (loadout.level, loadout.transformer) == (QuantLevel.Q4_0, str(gguf_path(tiny_model, QuantLevel.Q4_0)))
    with pytest.raises(FarmError, match="no weights for Q6_K"):
        choose_loadout(settings.model_copy(update={"level": QuantLevel.Q6_K}), str(tiny_model), None, "cpu")
    if nf4_installed():  # listed wherever bitsandbytes is, but it quantizes only on a CUDA GPU: refused up front
        with pytest.raises(FarmError, match="nf4 needs a CUDA GPU"):
            choose_loadout(settings.model_copy(update={"level": QuantLevel.NF4}), str(tiny_model), None, "cpu")


def test_the_operators_file_decides_the_level_and_a_contradicting_quant_fails(tiny_model: Path, tmp_path: Path) -> None:
    q8 = str(gguf_path(tiny_model, QuantLevel.Q8_0))
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    assert choose_loadout(settings, str(tiny_model), q8, "cpu").level == QuantLevel.Q8_0
    with pytest.raises(FarmError, match=r"--level Q4_0 asked for, but the transformer file .* holds Q8_0"):
        choose_loadout(settings.model_copy(update={"level": QuantLevel.Q4_0}), str(tiny_model), q8, "cpu")
    assert choose_loadout(settings, str(tiny_model), None, "cpu").level == QuantLevel.BF16


def _pixels(engine: RenderEngine) -> np.ndarray:
    rendered = engine.render(parse_job({"prompt": "a red fox", "width": 256, "height": 256, "steps": 3, "seed": 5}))
    return np.asarray(Image.open(io.BytesIO(rendered.png)).convert("RGB"), dtype=np.float64)


def test_fp8_keeps_scaled_e4m3_weights_and_renders_between_q8_0_and_q4_k(tiny_model: Path, tmp_path: Path) -> None:
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    reference = _pixels(RenderEngine(load_model(str(tiny_model), None, "cpu", settings)))
    fp8 = load_model(str(tiny_model), None, "cpu", settings, level=QuantLevel.FP8)
    assert fp8.level == QuantLevel.FP8
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


def test_a_pinned_sha256_is_checked_and_a_bad_download_is_deleted(
    tiny_model: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    q8 = gguf_path(tiny_model, QuantLevel.Q8_0)
    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(str(q8), bucket, "models/q8.gguf")
    settings = WorkerSettings(cache_dir=tmp_path / "cache", s3_endpoint_url=s3_server.endpoint_url)
    good = hashlib.sha256(q8.read_bytes()).hexdigest()
    fetched = resolve_file(f"s3://{bucket}/models/q8.gguf", settings, sha256=good)
    assert fetched.read_bytes() == q8.read_bytes() and fetched.is_relative_to(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="refusing to load it"):
        resolve_file(f"s3://{bucket}/models/q8.gguf", settings, sha256="0" * 64)
    assert not fetched.exists(), "a download that fails its pin is removed"
    with pytest.raises(ModelLoadError, match="refusing to load it"):
        resolve_file(str(q8), settings, sha256="0" * 64)
    assert q8.exists(), "a file the cache did not fetch is never deleted"


def test_the_download_cache_evicts_least_recently_used_files(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    for name in ("a", "b", "c"):
        s3_server.client().put_object(Bucket=bucket, Key=f"m/{name}.gguf", Body=bytes(400 * 1024))
    limit_gib = 1000 * 1024 / 1024**3  # room for two 400 KiB files
    settings = WorkerSettings(
        cache_dir=tmp_path / "cache", s3_endpoint_url=s3_server.endpoint_url, cache_max_gib=limit_gib
    )
    a = resolve_file(f"s3://{bucket}/m/a.gguf", settings)
    time.sleep(0.05)
    b = resolve_file(f"s3://{bucket}/m/b.gguf", settings)
    time.sleep(0.05)
    resolve_file(f"s3://{bucket}/m/a.gguf", settings)  # a is used again: b is now the oldest
    time.sleep(0.05)
    c = resolve_file(f"s3://{bucket}/m/c.gguf", settings)
    assert a.exists() and c.exists() and not b.exists()
    assert sum(p.stat().st_size for p in model_cache(settings).files()) <= limit_gib * 1024**3
