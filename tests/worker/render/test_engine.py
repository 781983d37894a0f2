"""The render engine's shared phases on the tiny model: one encode phase for many jobs, embeddings
cached by prompt, compatible jobs denoised as one batch, every image still its own seed's image."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.fast.step_graphs import remove_step_graphs, use_step_graphs
from fluxfarm.worker.model.host_mirror import HostMirror
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.model.plan import (
    EXTRA_IMAGE_STEP_GIB,
    Plan,
    _interpolate,
    decode_working_gib,
    headroom_gib,
    step_working_gib,
)
from fluxfarm.worker.render.engine import EmbeddingCache, RenderEngine, denoise_groups
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path


def _job(prompt: str, seed: int, width: int = 256, height: int = 256) -> RenderJob:
    return parse_job({"prompt": prompt, "seed": seed, "width": width, "height": height, "steps": 3})


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> RenderEngine:
    settings = WorkerSettings(cache_dir=tiny_model.parent / "cache")
    model = load_model(str(tiny_model), str(gguf_path(tiny_model, QuantLevel.Q8_0)), "cpu", settings)
    return RenderEngine(model, max_batch=2, embedding_cache=8)


def test_denoise_groups_batch_only_jobs_of_the_same_shape_up_to_the_limit() -> None:
    jobs = [_job("a", 1), _job("b", 2, width=320), _job("c", 3), _job("d", 4), _job("e", 5, width=320)]
    assert denoise_groups(jobs, 2) == [[0, 2], [1, 4], [3]]
    assert denoise_groups(jobs, 1) == [[0], [1], [2], [3], [4]]
    planned = {(256, 256): 1, (320, 256): 8}  # the plan's batch per size, under the worker's own cap
    assert denoise_groups(jobs, 4, lambda w, h: planned[(w, h)]) == [[0], [1, 4], [2], [3]]


def _plan_leaving(room_gib: float) -> Plan:
    """A 10 GiB Q8_0 plan whose resident part leaves `room_gib` beside the first 256² image's step."""
    usable = 10.0 - headroom_gib(10.0)
    return Plan(
        level="Q8_0",
        predicted_peak_gib=9.0,
        text_encoders="gpu",
        vae_tiling=False,
        vram_budget_gib=10.0,
        components_gib={},
        denoise_resident_gib=usable - step_working_gib(QuantLevel.Q8_0, 256 * 256) - room_gib,
        reasons=[],
    )


def test_the_engine_batches_as_its_plan_says(engine: RenderEngine) -> None:
    """Issue 21, point 2: under a plan whose batch at 256² is 2, four jobs denoise as two batches of two
    even though the worker would hold four."""
    plan = _plan_leaving(1.5 * _interpolate(*EXTRA_IMAGE_STEP_GIB, 256 * 256))
    assert plan.batch_limit(256, 256) == 2
    planned = RenderEngine(dataclasses.replace(engine.model, plan=plan), max_batch=4, embedding_cache=8)
    rendered = planned.render_batch([_job(f"planned {n}", n) for n in range(4)])
    assert [image.batch_size for image in rendered] == [2, 2, 2, 2]


def test_steps_replay_as_graphs_only_in_batches_whose_graph_fits_beside_the_decode(engine: RenderEngine) -> None:
    """A graph's pool keeps the step's memory while the batch decodes: a batch the plan has room for but not for
    its graph beside the decode runs eagerly, at the planned size, and a smaller one is free to replay."""
    pixels = 256 * 256
    plan = _plan_leaving(decode_working_gib(pixels, tiled=False) + 0.5 * _interpolate(*EXTRA_IMAGE_STEP_GIB, pixels))
    assert (plan.batch_limit(256, 256), plan.graph_batch_limit(256, 256)) == (3, 1)
    planned = RenderEngine(dataclasses.replace(engine.model, plan=plan), max_batch=4, embedding_cache=8)
    graphs = use_step_graphs(engine.model.pipe.transformer)
    try:
        rendered = planned.render_batch([_job(f"graphs {n}", n) for n in range(4)])
    finally:
        remove_step_graphs(engine.model.pipe.transformer)
    assert [image.batch_size for image in rendered] == [3, 3, 3, 1]
    # 3 steps each; the batch of one is let through, and on a CPU stops at its tensors being off the GPU.
    assert graphs.eager == {"no room for the graph beside the decode": 3, "encoder_hidden_states off the GPU": 3}


def test_a_gpu_swap_engine_runs_its_steps_eagerly(tiny_model: Path) -> None:
    """The transformer leaves the card for every encode phase, so a graph would be captured again each batch
    (run 15: slower than eager steps): a swapping engine holds its graphs off and says why."""
    settings = WorkerSettings(cache_dir=tiny_model.parent / "cache")
    model = load_model(str(tiny_model), str(gguf_path(tiny_model, QuantLevel.Q8_0)), "cpu", settings)
    swapping = RenderEngine(
        dataclasses.replace(model, text_encoders="gpu-swap", plan=_plan_leaving(10.0)), max_batch=2, embedding_cache=8
    )
    graphs = use_step_graphs(model.pipe.transformer)
    rendered = swapping.render_batch([_job(f"swapped {n}", n) for n in range(2)])
    assert [image.batch_size for image in rendered] == [2, 2]
    assert graphs.eager == {"the transformer leaves the card every encode phase": 3}


def test_a_batch_renders_each_job_as_its_own_render_would(engine: RenderEngine) -> None:
    jobs = [_job("a red fox", 1), _job("a blue whale", 2, width=320), _job("a green owl", 3)]
    batched = engine.render_batch(jobs)
    assert [r.batch_size for r in batched] == [2, 1, 2]
    assert [(r.width, r.height) for r in batched] == [(256, 256), (320, 256), (256, 256)]
    for job, result in zip(jobs, batched, strict=True):
        alone = engine.render(job)
        difference = np.abs(_pixels(result.png) - _pixels(alone.png)).max()
        assert difference <= 2, (job.prompt, difference)  # the same seed's image; summation order aside
    assert not np.array_equal(_pixels(batched[0].png), _pixels(batched[2].png))


def test_prompts_are_encoded_once_and_then_come_from_the_cache(engine: RenderEngine) -> None:
    cache = engine.embeddings
    engine.render(_job("a lighthouse at dusk", 7))
    hits, misses = cache.hits, cache.misses
    engine.render(_job("a lighthouse at dusk", 8))
    assert (cache.hits, cache.misses) == (hits + 1, misses)
    engine.render_batch([_job("a quiet harbour", 9), _job("a quiet harbour", 10)])
    assert cache.misses == misses + 1, "two jobs with one prompt encode it once"


def test_embedding_cache_evicts_the_least_recently_used() -> None:
    cache = EmbeddingCache(2)
    value = object()
    for key in ("a", "b"):
        cache.put(key, value)  # type: ignore[arg-type]
    cache.get("a")
    cache.put("c", value)  # type: ignore[arg-type]
    assert cache.get("b") is None and cache.get("a") is value and cache.get("c") is value
    assert EmbeddingCache.key(_job("x", 1)) == EmbeddingCache.key(_job("x", 2)) != EmbeddingCache.key(_job("y", 1))


def test_host_mirror_keeps_one_host_copy_and_restores_the_weights() -> None:
    module = torch.nn.Linear(8, 4)
    before = module.weight.detach().clone()
    mirror = HostMirror(module)
    pointer = module.weight.data_ptr()
    mirror.to_device("cpu")
    mirror.to_host()
    assert module.weight.data_ptr() == pointer, "going back to the host copies nothing"
    assert torch.equal(module.weight, before)


def test_jobs_held_by_several_task_threads_render_together(engine: RenderEngine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fluxfarm.worker.render.batcher import RenderBatcher

    batcher = RenderBatcher(engine, max_jobs=3, wait_s=2.0)
    jobs = [_job(f"a paper boat {i}", 20 + i) for i in range(3)]
    with ThreadPoolExecutor(3) as threads:  # as Celery's threads pool hands them over
        rendered = list(threads.map(batcher.render, jobs))
    assert sorted(r.batch_size for r in rendered) == [1, 2, 2]  # one gathered call; the engine batches by 2
    assert len({r.png for r in rendered}) == 3
    with pytest.raises(ZeroDivisionError):  # a failing job (no steps; bypassing validation) reaches its caller
        batcher.render(_job("a kite", 1).model_copy(update={"steps": 0}))


def test_rendering_as_a_worker_keeps_job_order_encodes_pngs_off_the_gpu_thread_and_stops(engine: RenderEngine) -> None:
    import threading

    from fluxfarm.worker.tools.bench import render_as_worker

    jobs = [_job(f"a lantern {i}", 40 + i) for i in range(3)]
    threads_before = threading.active_count()
    # A full batch goes at once; only the last, lone job waits out wait_s. 0.5 s was once too short for the second
    # job's thread to arrive on a loaded 2-core machine (batches [1, 2, 2]).
    rendered, pngs = render_as_worker(engine, jobs, batch=2, wait_s=3.0)
    assert [r.job for r in rendered] == jobs
    assert [r.batch_size for r in rendered] == [2, 2, 1]
    assert pngs == [r.png for r in rendered]  # encoded once, by the task thread, then kept
    alone = engine.render(jobs[2])
    assert np.abs(_pixels(pngs[2]) - _pixels(alone.png)).max() <= 2
    assert threading.active_count() == threads_before  # the render thread and the task threads are gone
