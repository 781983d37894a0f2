"""`fluxfarm worker`: load the pipeline once, then consume render jobs with a solo Celery pool."""

from __future__ import annotations

import logging
import socket
import time

from shared.celery_app import QUEUE_ANY, make_celery_app
from shared.settings import FarmSettings, redact_url
from shared.storage import open_store
from worker.engine import RenderEngine
from worker.gpu import default_device, probe_device
from worker.job_runner import JobRunner
from worker.pipeline import load_model
from worker.tasks import register_render_task

log = logging.getLogger("fluxfarm.worker")


def _quiet_library_progress_bars() -> None:
    """A worker log is read by people and tools: one line per event, no tqdm redraws."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def node_name(settings: FarmSettings, device: str) -> str:
    return settings.worker_name or f"fluxfarm-{device.replace(':', '')}@{socket.gethostname()}"


def run_worker(settings: FarmSettings, model: str, transformer: str | None, device: str | None) -> None:
    """Blocks until the worker is stopped (SIGTERM finishes the current job first)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_progress_bars()
    device = device or settings.device or default_device()
    worker_info = probe_device(device)
    store = open_store(settings)
    log.info(
        "starting on %s (%s), broker %s, storage %s",
        device,
        worker_info.gpu_name or "CPU",
        redact_url(settings.broker_url),
        redact_url(settings.storage_url),
    )
    load_start = time.perf_counter()
    loaded = load_model(model, transformer, device, settings)
    load_s = time.perf_counter() - load_start
    log.info("model loaded in %.2fs: %s, level %s", load_s, loaded.info.transformer, loaded.quant)
    app = make_celery_app(settings)
    register_render_task(app, JobRunner(RenderEngine(loaded), store, worker_info, load_s))
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--hostname={node_name(settings, device)}",
            f"--queues={QUEUE_ANY}",
            f"--loglevel={settings.log_level}",
            "--task-events",
        ]
    )
