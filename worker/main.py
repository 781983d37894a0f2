"""`fluxfarm worker`: load the pipeline once, then consume render jobs.

Celery's threads pool holds two batches of jobs (2 x FLUXFARM_MAX_BATCH), one task thread each; the
RenderBatcher's single render thread renders them a batch at a time while the other batch's threads
encode and store their PNGs (worker/render/batcher.py)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import NoReturn

from celery.signals import worker_ready
from celery.worker.consumer import Consumer

from fluxfarm.shared.celery_app import make_celery_app
from fluxfarm.shared.redis_conn import open_redis, wait_until_reachable
from fluxfarm.shared.settings import redact_url
from fluxfarm.shared.storage import open_store
from fluxfarm.worker.model.gpu import (
    cap_memory,
    card_bytes,
    default_device,
    probe_device,
    vram_peak_bytes,
)
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.metrics import WorkerMetrics, serve_metrics
from fluxfarm.worker.serve.runtime import WorkerRuntime
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger("fluxfarm.worker")


def _quiet_library_progress_bars() -> None:
    """A worker log is read by people and tools: one line per event, no tqdm redraws."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


EXIT_STRANDED = 75
"""The worker's exit status when it lost its model (EX_TEMPFAIL: a restart loads it afresh)."""


def _exit_stranded(reason: str) -> NoReturn:
    """No model left to render with: leave at once; the held jobs' leases lapse and others take them."""
    log.critical("%s; exiting so that the worker is restarted", reason)
    logging.shutdown()
    os._exit(EXIT_STRANDED)


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (None elsewhere): what a worker paid for its interpreter,
    imports and device probe before its first log line, part of every time to first image."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def node_name(settings: WorkerSettings, device: str) -> str:
    return settings.worker_name or f"fluxfarm-{device.replace(':', '')}@{socket.gethostname()}"


def run_worker(settings: WorkerSettings, model: str, transformer: str | None, device: str | None) -> None:
    """Blocks until the worker is stopped (SIGTERM finishes the current job first)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_progress_bars()
    device = device or settings.device or default_device()
    node = node_name(settings, device)
    probe_start = time.perf_counter()
    worker_info = probe_device(device, node)
    probe_s = time.perf_counter() - probe_start
    age_s = process_age_s()
    log.info(
        "starting %s on %s (%s), broker %s, storage %s; %s after the process started (device probe %.2fs)",
        node,
        device,
        worker_info.gpu_name or "CPU",
        redact_url(settings.broker_url),
        redact_url(settings.storage_url),
        "?" if age_s is None else f"{age_s:.1f}s",
        probe_s,
    )
    if settings.vram_budget_gib:
        cap_memory(device, settings.vram_budget_gib)
    metrics = WorkerMetrics()
    metrics_port = serve_metrics(metrics, settings.metrics_address, settings.metrics_port)
    if (total := card_bytes(device)) is not None:
        metrics.watch_vram(device, lambda: vram_peak_bytes(device), total)
    metrics_url = f"http://{worker_info.hostname}:{metrics_port}/metrics" if metrics_port else None
    loader = EngineLoader(settings, model, transformer, device, worker_info, metrics)
    app = make_celery_app(settings)
    broker_redis = open_redis(settings)  # thread-safe: heartbeat and task threads share it
    wait_until_reachable(broker_redis)
    runtime = WorkerRuntime(
        app, broker_redis, open_store(settings), loader, worker_info, metrics, metrics_url, _exit_stranded
    )
    log.info("consuming %s", ", ".join(runtime.adoption.queues))

    def on_ready(sender: Consumer, **_: object) -> None:
        if sender.app is app:
            runtime.consumer_ready(sender)

    worker_ready.connect(on_ready, weak=False)
    runtime.start()
    try:
        app.worker_main(runtime.celery_argv())
    finally:
        runtime.stop()
