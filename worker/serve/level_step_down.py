"""Step a worker down the quant ladder when a job runs out of GPU memory even rendered alone.

The batch was already split (worker/render/engine.py); a job that still does not fit at batch 1 needs a
smaller transformer. A worker that picked its own level (no FLUXFARM_LEVEL, no transformer file:
the operator left the choice to the policy) reloads the best level below its own that the job
accepts, from the same catalog it loaded from, and from then on consumes that level's queues. The
old weights go first (both never fit); if no lower level loads, the old level is loaded again and
the job fails with its reason; if not even that loads, the worker has no model and `on_stranded`
ends it (its held jobs go back to the queue with their leases, and its supervisor restarts it).
A worker whose level was chosen by its operator never changes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import torch

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.catalog import available_levels, load_catalog
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_NEEDS_CUDA = (QuantLevel.FP8, QuantLevel.NF4)


def step_down_levels(settings: WorkerSettings, model: str, transformer: str | None, device: str) -> list[QuantLevel]:
    """The levels this worker may step down to, best first; empty where its policy forbids stepping."""
    if not settings.oom_step_down or settings.level is not None or transformer is not None:
        return []
    levels = set(available_levels(load_catalog(settings.catalog), model))
    if torch.device(device).type != "cuda":
        levels -= set(_NEEDS_CUDA)
    return sorted(levels, key=lambda level: level.quality_rank)


class LevelStepDown:
    """`step_down(engine, job)` is called by the render thread (the only one on the GPU)."""

    def __init__(
        self,
        levels: list[QuantLevel],
        load: Callable[[QuantLevel], RenderEngine],
        on_switch: Callable[[QuantLevel], None],
        on_stranded: Callable[[str], NoReturn],
    ) -> None:
        self._levels = levels
        self._load = load
        self._on_switch = on_switch
        self._on_stranded = on_stranded

    def below(self, current: QuantLevel, job: RenderJob) -> list[QuantLevel]:
        """Levels under `current` that `job` accepts, best first."""
        return [
            level
            for level in self._levels
            if level.quality_rank > current.quality_rank and job.constraint.allows(level)
        ]

    def step_down(self, engine: RenderEngine, job: RenderJob) -> RenderEngine | None:
        """A loaded engine one level down (the old one unloaded), or None (nothing lower, engine kept)."""
        current = engine.model.level
        targets = self.below(current, job)
        if not targets:
            return None
        log.warning("job %s does not fit at %s even alone; unloading %s to step down", job.id, current, current)
        engine.unload()
        for level in [*targets, current]:  # the current level last: back where it was if nothing lower loads
            try:
                loaded = self._load(level)
            except (FarmError, torch.OutOfMemoryError) as error:
                log.warning("could not load %s (%s)", level, error)
                continue
            if level != current:
                log.warning("stepped down from %s to %s", current, level)
                self._on_switch(level)
            return loaded
        self._on_stranded(f"no level could be loaded after unloading {current}")
