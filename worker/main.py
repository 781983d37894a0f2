"""`fluxfarm worker`: load the pipeline once, then consume render jobs.

Celery's threads pool holds two batches of jobs (2 x FLUXFARM_MAX_BATCH), one task thread each; the
RenderBatcher's single render thread renders them a batch at a time while the other batch's threads
encode and store their PNGs (worker/batcher.py)."""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import NoReturn

import torch
from celery.utils.nodenames import default_nodename

from shared import __version__
from shared.celery_app import lease_renew_interval_s, make_celery_app, send_render
from shared.datasets import DatasetBook, SentJob
from shared.fleet import WorkerStatus
from shared.jobs import parse_job
from shared.ladder import QuantLevel, parse_level
from shared.redis_conn import open_redis
from shared.routing import queues_for_level
from shared.settings import FarmSettings, redact_url
from shared.storage import open_store
from worker.batcher import RenderBatcher, held_jobs
from worker.engine import RenderEngine
from worker.fault_injection import parse_fault_plan
from worker.gpu import cap_memory, card_bytes, compute_capability, default_device, probe_device, vram_peak_bytes
from worker.heartbeat import Heartbeat
from worker.job_runner import JobRunner
from worker.leases import InFlight, JobClaims, LeaseKeeper
from worker.level_step_down import LevelStepDown, step_down_levels
from worker.loadout import choose_loadout
from worker.lost_jobs import LostJobSweeper
from worker.metrics import WorkerMetrics, serve_metrics
from worker.periodic import Periodic
from worker.pipeline import load_model
from worker.result_store import ResultStore
from worker.tasks import register_render_task

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


def node_name(settings: FarmSettings, device: str) -> str:
    return settings.worker_name or f"fluxfarm-{device.replace(':', '')}@{socket.gethostname()}"


def run_worker(settings: FarmSettings, model: str, transformer: str | None, device: str | None) -> None:
    """Blocks until the worker is stopped (SIGTERM finishes the current job first)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_progress_bars()
    device = device or settings.device or default_device()
    node = node_name(settings, device)
    worker_info = probe_device(device, node)
    store = open_store(settings)
    log.info(
        "starting %s on %s (%s), broker %s, storage %s",
        node,
        device,
        worker_info.gpu_name or "CPU",
        redact_url(settings.broker_url),
        redact_url(settings.storage_url),
    )
    if settings.vram_budget_gib:
        cap_memory(device, settings.vram_budget_gib)
    metrics = WorkerMetrics()
    metrics_port = serve_metrics(metrics, settings.metrics_address, settings.metrics_port)
    if (total := card_bytes(device)) is not None:
        metrics.watch_vram(device, lambda: vram_peak_bytes(device), total)
    faults = parse_fault_plan(settings.inject_faults)
    if faults is not None:
        log.warning("fault drill: this worker injects %s", faults.model_dump_json(exclude_none=True))

    def load_engine(level_settings: FarmSettings) -> tuple[RenderEngine, float]:
        loadout = choose_loadout(level_settings, model, transformer, device)
        if loadout.plan is not None:
            log.info("plan: %s", loadout.plan.model_dump_json())
        load_start = time.perf_counter()
        loaded = load_model(
            model,
            loadout.transformer,
            device,
            level_settings,
            level=loadout.level,
            text_encoders=loadout.text_encoders,
            vae_tiling=loadout.vae_tiling,
            transformer_path=loadout.transformer_path,
        )
        load_s = time.perf_counter() - load_start
        log.info("model loaded in %.2fs: %s, level %s", load_s, loaded.info.transformer, loaded.quant)
        metrics.model_loaded(loaded.quant, load_s)
        metrics.describe_worker(
            {
                "node": node,
                "hostname": worker_info.hostname,
                "device": device,
                "gpu": worker_info.gpu_name or "cpu",
                "level": loaded.quant,
                "model": loaded.info.id,
                "version": __version__,
            }
        )
        engine = RenderEngine(loaded, settings.max_batch, settings.embedding_cache, faults, settings)
        return engine, load_s

    engine, load_s = load_engine(settings)
    queues = queues_for_level(parse_level(engine.model.quant))
    log.info("consuming %s", ", ".join(queues))
    app = make_celery_app(settings)

    def switch_queues(level: QuantLevel) -> None:
        """After a step down: consume the new level's queues, stop consuming the ones it cannot serve."""
        new, me = queues_for_level(level), [default_nodename(node)]
        for queue in [q for q in new if q not in queues]:
            app.control.add_consumer(queue, destination=me)
        for queue in [q for q in queues if q not in new]:
            app.control.cancel_consumer(queue, destination=me)
        queues[:] = new
        log.info("consuming %s", ", ".join(queues))

    stepper = LevelStepDown(
        step_down_levels(settings, model, transformer, device),
        lambda level: load_engine(settings.model_copy(update={"quant": level.value}))[0],
        switch_queues,
        _exit_stranded,
    )
    batcher = RenderBatcher(engine, settings.max_batch, settings.batch_wait_s, stepper.step_down)
    broker_redis = open_redis(settings)  # thread-safe: heartbeat and task threads share it
    book = DatasetBook(broker_redis)
    claims = JobClaims(broker_redis, node, settings.lease_s)
    results = ResultStore(store, settings.storage_retry_s)
    runner = JobRunner(batcher, results, book, claims, worker_info, load_s, settings.max_attempts, metrics)
    started_at = datetime.now(UTC)
    capability = compute_capability(device)
    metrics_url = f"http://{worker_info.hostname}:{metrics_port}/metrics" if metrics_port else None

    def snapshot() -> WorkerStatus:
        return WorkerStatus(
            node=node,
            hostname=worker_info.hostname,
            device=device,
            gpu_name=worker_info.gpu_name,
            vram_gib=worker_info.vram_gib,
            level=batcher.engine.model.quant,
            model=batcher.engine.model.info.id,
            queues=list(queues),
            started_at=started_at,
            last_seen=started_at,
            jobs_done=runner.stats.jobs_done,
            jobs_failed=runner.stats.jobs_failed,
            images_rendered=runner.stats.images_rendered,
            images_per_hour=runner.stats.images_per_hour(),
            current_job=runner.stats.current_job,
            compute_capability=capability,
            vram_budget_gib=settings.vram_budget_gib,
            vram_peak_gib=round(vram_peak_bytes(device) / 2**30, 2) if capability else None,
            torch_version=torch.__version__,
            metrics_url=metrics_url,
        )

    in_flight = InFlight()
    register_render_task(app, runner, in_flight)
    heartbeat = Heartbeat(broker_redis, snapshot).start()
    leases = LeaseKeeper(broker_redis, claims, in_flight)
    renewals = Periodic("fluxfarm-leases", lease_renew_interval_s(settings.lease_s), leases.renew_once).start()

    def resend(sent: SentJob) -> None:
        send_render(app, parse_job(sent.job), sent.priority, sent.queued_at, sent.keep_result)

    sweep_s = max(10, settings.lease_s)
    sweeper = LostJobSweeper(broker_redis, book, resend, grace_s=2 * settings.lease_s, interval_s=sweep_s)
    sweeps = Periodic("fluxfarm-lost-jobs", sweep_s, sweeper.sweep_once).start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={held_jobs(settings.max_batch)}",
                f"--hostname={node}",
                f"--queues={','.join(queues)}",
                f"--loglevel={settings.log_level}",
                "--task-events",
            ]
        )
    finally:
        sweeps.stop()
        renewals.stop()
        heartbeat.stop(node)
        batcher.close()
