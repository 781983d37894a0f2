"""A worker's Prometheus metrics, served at `http://<host>:FLUXFARM_METRICS_PORT/metrics`.

One registry per worker process (Celery runs the worker with the threads pool, so one process holds
every task and a plain registry is exact). Labels stay few and bounded: the quant level, the phase,
the outcome, the device; never a job id, a dataset or a prompt. The fleet-wide view (queues,
datasets, dead letters) is not here: `fluxfarm exporter` serves it from Redis (producer/exporter.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import RenderResult

log = logging.getLogger(__name__)

Outcome = Literal["rendered", "already_stored", "retried", "dead_lettered", "cancelled", "refused", "failed"]
"""How a job left this worker: rendered and stored; found stored; attempt failed and went back to
the queue; dead-lettered after its attempts; its dataset was cancelled; refused as invalid (the
queue is not trusted); failed outside any attempt (Redis or storage unreachable)."""
PHASES = ("encode", "denoise", "decode", "png", "upload")
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.1, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 7 * 24 * 3600)
LOAD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 2400)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class WorkerMetrics:
    """Every metric family a worker serves; the job runner and the model loader record into it."""

    def __init__(self) -> None:
        disable_created_metrics()  # `*_created` would be one more series per counter and histogram, unused
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.info = Info("fluxfarm_worker", "What this worker is and holds.", registry=self.registry)
        by_outcome = ["level", "outcome"]
        self.jobs = Counter("fluxfarm_jobs", "Jobs that left this worker.", by_outcome, registry=self.registry)
        self.in_progress = Gauge(
            "fluxfarm_jobs_in_progress",
            "Jobs this worker holds now (waiting to render, rendering, storing).",
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "fluxfarm_render_phase_seconds",
            "Seconds of each phase of a rendered job (encode and denoise are its share of its batch).",
            ["level", "phase"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "fluxfarm_queue_wait_seconds",
            "Seconds from the producer's enqueue to the render's start (producer and worker clocks).",
            ["level"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fluxfarm_batch_size", "Jobs denoised together.", ["level"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.model_load_seconds = Histogram(
            "fluxfarm_model_load_seconds",
            "Seconds to load the pipeline at a level (a step down loads again).",
            ["level"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.vram_peak_bytes = Gauge(
            "fluxfarm_vram_peak_bytes",
            "Peak GPU memory torch allocated since the worker started.",
            ["device"],
            registry=self.registry,
        )
        self.vram_total_bytes = Gauge(
            "fluxfarm_vram_total_bytes",
            "GPU memory of the card (before any FLUXFARM_VRAM_BUDGET_GIB cap).",
            ["device"],
            registry=self.registry,
        )

    def describe_worker(self, facts: dict[str, str]) -> None:
        """Node, GPU, level, model, version: set at start and again after a step down."""
        self.info.info(facts)

    def watch_vram(self, device: str, peak_bytes: Callable[[], float], total_bytes: float) -> None:
        """Read the peak when Prometheus scrapes, not after every job."""
        self.vram_peak_bytes.labels(device=device).set_function(peak_bytes)
        self.vram_total_bytes.labels(device=device).set(total_bytes)

    def model_loaded(self, level: QuantLevel, seconds: float) -> None:
        self.model_load_seconds.labels(level=level).observe(seconds)

    def job_rendered(self, result: RenderResult) -> None:
        level, timings = result.quant, result.timings
        self.jobs.labels(level=level, outcome="rendered").inc()
        for phase in PHASES:
            self.phase_seconds.labels(level=level, phase=phase).observe(getattr(timings, f"{phase}_s"))
        self.batch_size.labels(level=level).observe(timings.batch_size)
        if timings.queued_at is not None:
            wait = (timings.started_at - timings.queued_at).total_seconds()
            self.queue_wait_seconds.labels(level=level).observe(max(0.0, wait))

    def job_ended(self, level: QuantLevel, outcome: Outcome) -> None:
        """Every outcome but `rendered`, which `job_rendered` counts with its timings."""
        self.jobs.labels(level=level, outcome=outcome).inc()


def serve_metrics(metrics: WorkerMetrics, address: str, port: int) -> int | None:
    """Start the /metrics HTTP server on a daemon thread; the port it listens on, or None with port 0
    (metrics off) or when it could not bind (the worker renders on: an error in the log, not a dead worker)."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as error:
        log.error(
            "metrics not served: cannot listen on %s:%d (%s); give each worker on a host its own "
            "FLUXFARM_METRICS_PORT, or 0 to turn metrics off",
            address,
            port,
            error,
        )
        return None
    bound = int(server.server_port)
    log.info("metrics at http://%s:%d/metrics", address, bound)
    return bound
