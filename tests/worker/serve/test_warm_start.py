"""A worker's warm start on the tiny model: before-jobs warm-up renders every batch size the worker can be
handed at each warm-up size before its first job; the first worker of a class publishes its compiled code
after its first batch (first-use) and a later one loads it instead of publishing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.settings import WorkerSettings

SECRET = "a-test-secret-of-32-characters!!"


def _loader(tiny_model: Path, tmp_path: Path, **settings: object) -> EngineLoader:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    worker_settings = WorkerSettings(
        storage_url=f"file://{tmp_path / 'out'}",
        cache_dir=tmp_path / "cache",
        max_batch=2,
        **settings,  # type: ignore[arg-type]
    )
    worker = WorkerInfo(node="w-warm", hostname="here", device="cpu", gpu_name=None, vram_gib=None)
    transformer = str(gguf_path(tiny_model, QuantLevel.Q8_0))
    return EngineLoader(worker_settings, str(tiny_model), transformer, "cpu", worker, WorkerMetrics())


def test_before_jobs_warm_up_renders_each_batch_size_at_each_size(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loader = _loader(tiny_model, tmp_path, warmup="before-jobs", warmup_sizes=["256x256", "512x256"])
    with caplog.at_level(logging.INFO, logger="fluxfarm.worker.serve.warm_start"):
        loader.load()
    warmed = [r.getMessage().split(" in ")[0] for r in caplog.records if r.getMessage().startswith("warmed up")]
    assert warmed == [
        "warmed up 256x256 at batch 1",
        "warmed up 256x256 at batch 2",
        "warmed up 512x256 at batch 1",
        "warmed up 512x256 at batch 2",
    ]
    assert not list((tmp_path / "out").glob("**/*.png"))  # warm-up images are thrown away, never stored


def test_first_use_publishes_after_the_first_batch_and_the_next_worker_loads(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path / 'compile-cache'}"
    loader = _loader(tiny_model, tmp_path, compile_cache_url=url, compile_cache_secret=SECRET)
    # torch.compile runs only on GPUs in a worker; here the engine is marked compiled and a function compiled
    # in this process stands for its blocks (what save_cache_artifacts returns is whatever the process compiled).
    engine, _ = loader.load()
    assert loader.warm_start._unpublished is None  # not compiled: nothing to share
    engine.model.fast_paths.compiled = True
    loader.warm_start.prepare(engine)
    assert loader.warm_start._unpublished is not None

    torch.compile(lambda x: torch.tanh(x) * 2, fullgraph=True)(torch.randn(4, 4))
    batcher = RenderBatcher(engine, 2, 0.0, after_batch=loader.warm_start.after_batch)
    job = RenderJob(prompt="a lighthouse", width=256, height=256, steps=2, dataset="warm")
    with caplog.at_level(logging.INFO, logger="fluxfarm.worker.fast.compile_cache"):
        batcher.render(job)
        batcher.render(job.model_copy(update={"seed": 1}))
        batcher.close()
    published = [r.getMessage() for r in caplog.records if "published" in r.getMessage()]
    assert len(published) == 1, published  # after the first batch only
    assert len(list((tmp_path / "compile-cache" / "compile-cache").iterdir())) == 1

    caplog.clear()
    second = _loader(tiny_model, tmp_path, compile_cache_url=url, compile_cache_secret=SECRET)
    with caplog.at_level(logging.INFO, logger="fluxfarm.worker.fast.compile_cache"):
        second.warm_start.prepare(engine)  # the same class of worker: it loads, and has nothing to publish
    assert any("loaded" in r.getMessage() for r in caplog.records)
    assert second.warm_start._unpublished is None
