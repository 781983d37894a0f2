"""A worker's warm start: its compiled code from the shared compile cache (worker/fast/compile_cache.py) and,
by FLUXFARM_WARMUP, its shapes prepared before it takes jobs.

A compiled step is specialised to its image size and batch (static shapes are faster), so a worker compiles
once per (size, batch) it meets, and captures a CUDA graph for each. With `first-use` (the default) that
happens on the first job of each shape, which then waits; with `before-jobs` the worker renders one small
job group of every batch size its plan allows at each FLUXFARM_WARMUP_SIZES size before its consumer starts.
Either way, the first worker of a class publishes what it compiled (after its warm-up, or after its first
batch) and later workers of the class load it before anything else.
"""

from __future__ import annotations

import logging
import time

import torch._dynamo.utils
from pydantic import ValidationError

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.storage import open_store_url
from fluxfarm.shared.units import MIB
from fluxfarm.worker.fast.compile_cache import CompileCacheKey, SharedCompileCache
from fluxfarm.worker.fast.step_graphs import step_graphs
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
"""Steps of a warm-up render: each shape's blocks compile and its step graph is captured on the first ones."""
FIRST_USE = ("first-use",)


def first_batch_costs(engine: RenderEngine) -> str:
    """The one-off costs in a worker's first batches so far: torch.compile's (Dynamo's own counters: its tracing,
    and all of it with the backend, from the shared artifacts or not) and the step graphs' (eager calls before
    each capture, then the captures), and the steps that ran eagerly, by why (none, where every step can be
    captured)."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    compiling, tracing = sum(metrics.get("_compile.compile_inner", [])), sum(metrics.get("bytecode_tracing", []))
    graphs = step_graphs(engine.model.pipe.transformer)
    if graphs is None:
        return f"compiling {compiling:.2f}s (tracing {tracing:.2f}s), no step graphs"
    eager = ", ".join(f"{why} {count}" for why, count in graphs.eager.most_common()) or "none"
    return (
        f"compiling {compiling:.2f}s (tracing {tracing:.2f}s), step graphs: eager calls before capture "
        f"{graphs.warmup_s:.2f}s (compiling included), capture {graphs.capture_s:.2f}s, {graphs.captures} captured, "
        f"{graphs.replays} replays, steps run eagerly: {eager}"
    )


class WarmStart:
    """Loads shared compiled code into a new engine, warms its shapes up, and publishes what it compiled."""

    def __init__(self, settings: WorkerSettings, flux_model: FluxModel) -> None:
        self._settings = settings
        self._flux_model = flux_model
        self._cache: SharedCompileCache | None = None
        if settings.compile_cache_url and settings.compile_cache_secret:
            self._cache = SharedCompileCache(
                open_store_url(settings.compile_cache_url, settings),
                settings.compile_cache_secret.get_secret_value().encode(),
                settings.compile_cache_max_mib * MIB,
            )
        self._unpublished: CompileCacheKey | None = None
        """first-use: the key this worker publishes under after its first rendered batch."""
        self._first_batch_of: RenderEngine | None = None
        """The engine whose first batch is still to be accounted for in the log."""

    def shapes(self, engine: RenderEngine) -> list[tuple[int, int, int]]:
        """(width, height, batch) of every job group the engine can be handed at the warm-up sizes."""
        plan = engine.model.plan
        found = []
        for size in self._settings.warmup_sizes:
            width, height = (int(side) for side in size.split("x"))
            limit = min(engine.max_batch, plan.batch_limit(width, height)) if plan else engine.max_batch
            found.extend((width, height, batch) for batch in range(1, max(1, limit) + 1))
        return found

    def prepare(self, engine: RenderEngine) -> None:
        """Before the engine's first job: load the shared artifacts, then warm up (before-jobs)."""
        started = time.perf_counter()
        self._first_batch_of = engine
        before_jobs = self._settings.warmup == "before-jobs"
        shapes = self.shapes(engine) if before_jobs else []
        key = None
        if self._cache is not None and engine.model.fast_paths.compiled:
            named = tuple(f"{w}x{h}@{b}" for w, h, b in shapes) if before_jobs else FIRST_USE
            key = CompileCacheKey.for_device(
                engine.model.device,
                self._flux_model.value,
                engine.model.level.value,
                engine.model.fast_paths.model_dump_json(exclude={"compiled"}),
                named,
            )
            if self._cache.load(key):
                key = None  # this class's artifacts are published already
        if before_jobs:
            self._warm_up(engine, shapes)
            if key is not None and self._cache is not None:
                self._cache.publish(key)
        else:
            self._unpublished = key
        log.info("warm start ready in %.1fs", time.perf_counter() - started)

    def after_batch(self) -> None:
        """first-use: publish once, after the first batch has compiled its shape. Either way, say once where the
        first batch's time beyond rendering went: compiling, and the step graphs' warm-up and capture."""
        if (engine := self._first_batch_of) is not None:
            self._first_batch_of = None
            log.info("first batch: %s", first_batch_costs(engine))
        if self._unpublished is not None and self._cache is not None:
            key, self._unpublished = self._unpublished, None
            self._cache.publish(key)

    def _warm_up(self, engine: RenderEngine, shapes: list[tuple[int, int, int]]) -> None:
        for width, height, batch in shapes:
            try:
                jobs = [
                    RenderJob(
                        prompt="warm-up",
                        model=self._flux_model,
                        width=width,
                        height=height,
                        steps=WARMUP_STEPS,
                        seed=seed,
                        dataset="fluxfarm-warmup",
                    )
                    for seed in range(batch)
                ]
            except ValidationError as error:  # a size or a family this worker cannot render without inputs
                log.warning("warm-up of %dx%d skipped: %s", width, height, error.errors()[0]["msg"])
                return
            started = time.perf_counter()
            engine.render_batch(jobs)
            log.info("warmed up %dx%d at batch %d in %.1fs", width, height, batch, time.perf_counter() - started)
