"""Load the render engine a worker serves with: at start, and again one level down when a job does not
fit (worker/serve/level_step_down.py). Each load is timed, logged and described in the metrics."""

from __future__ import annotations

import dataclasses
import logging
import time

from fluxfarm.shared import __version__
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.worker.model.catalog import resolve_model
from fluxfarm.worker.model.host_memory import OwnMemoryPeak, process_host_memory
from fluxfarm.worker.model.loadout import choose_loadout
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.render.fault_injection import parse_fault_plan
from fluxfarm.worker.render.render_free import RenderFreeEngine
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.serve.warm_start import WarmStart
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class EngineLoader:
    """What a worker loads (its model, transformer and device) and how the loads are reported."""

    def __init__(
        self,
        settings: WorkerSettings,
        model: str,
        transformer: str | None,
        device: str,
        worker: WorkerInfo,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.model = model
        self.flux_model = resolve_model(model, settings.model_name)[1]
        """The catalog model this worker serves: its queues, and the only jobs it renders."""
        self.transformer = transformer
        self.device = device
        self._worker = worker
        self._metrics = metrics
        self.warm_start = WarmStart(settings, self.flux_model)
        """Shared compiled code and warm-up for each engine loaded (a step down's too)."""
        self._faults = parse_fault_plan(settings.inject_faults)
        if self._faults is not None:
            log.warning("fault drill: this worker injects %s", self._faults.model_dump_json(exclude_none=True))

    def load(self, level_settings: WorkerSettings | None = None) -> tuple[RenderEngine, float]:
        """The engine for `level_settings` (the worker's own settings, or a step down's) and its load time."""
        level_settings = level_settings or self.settings
        if level_settings.render_free:
            log.warning("render-free: no model is loaded, every job is stored as an 8x8 placeholder")
            engine = RenderFreeEngine(level_settings.level or QuantLevel.BF16, level_settings.max_batch)
            return engine, 0.0  # type: ignore[return-value]
        loadout = choose_loadout(level_settings, self.model, self.transformer, self.device, self.flux_model)
        if loadout.plan is not None:
            log.info("plan: %s", loadout.plan.model_dump_json())
        load_start = time.perf_counter()
        with OwnMemoryPeak() as own_peak:
            loaded = load_model(
                self.model,
                loadout.transformer,
                self.device,
                level_settings,
                level=loadout.level,
                text_encoders=loadout.text_encoders,
                text_encoder_precision=loadout.text_encoder_precision,
                vae_tiling=loadout.vae_tiling,
                transformer_path=loadout.transformer_path,
                flux_model=self.flux_model,
            )
        loaded = dataclasses.replace(loaded, plan=loadout.plan)
        load_s = time.perf_counter() - load_start
        host = process_host_memory()
        log.info(
            "model loaded in %.2fs: %s, level %s; host memory %s",
            load_s,
            loaded.weights.transformer,
            loaded.level,
            f"{host.resident:.1f} GiB resident ({host.anonymous:.1f} GiB its own, the rest mapped files), "
            f"{host.peak:.1f} GiB at its peak (mapped weight files included), its own at most "
            f"{own_peak.gib or 0.0:.1f} GiB while loading"
            if host
            else "unknown",
        )
        self._metrics.model_loaded(loaded.level, load_s)
        self._metrics.describe_worker(
            {
                "node": self._worker.node,
                "hostname": self._worker.hostname,
                "device": self.device,
                "gpu": self._worker.gpu_name or "cpu",
                "level": loaded.level,
                "model": loaded.weights.model_id,
                "flux_model": self.flux_model.value,
                "version": __version__,
            }
        )
        s = self.settings
        engine = RenderEngine(loaded, s.max_batch, s.embedding_cache, self._faults, s)
        self.warm_start.prepare(engine)
        return engine, load_s
