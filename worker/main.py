"""`fluxfarm worker`: load the pipeline once, then consume render jobs.

Celery's threads pool holds two batches of jobs (2 x FLUXFARM_MAX_BATCH), one task thread each; the
RenderBatcher's single render thread renders them a batch at a time while the other batch's threads
encode and store their PNGs (worker/render/batcher.py)."""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import NoReturn

import torch
from celery.signals import worker_ready
from celery.worker.consumer import Consumer

from fluxfarm.shared import __version__
from fluxfarm.shared.celery_app import lease_renew_interval_s, make_celery_app
from fluxfarm.shared.datasets import DatasetBook, SentJob
from fluxfarm.shared.fleet import WorkerStatus
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import parse_level
from fluxfarm.shared.publish import publish
from fluxfarm.shared.redis_conn import open_redis
from fluxfarm.shared.settings import FarmSettings, redact_url
from fluxfarm.shared.storage import open_store
from fluxfarm.worker.model.gpu import (
    cap_memory,
    card_bytes,
    compute_capability,
    default_device,
    probe_device,
    vram_peak_bytes,
)
from fluxfarm.worker.model.loadout import choose_loadout
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.render.batcher import RenderBatcher, held_jobs
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.render.fault_injection import parse_fault_plan
from fluxfarm.worker.serve.heartbeat import Heartbeat
from fluxfarm.worker.serve.job_runner import JobRunner
from fluxfarm.worker.serve.leases import InFlight, JobClaims, LeaseKeeper
from fluxfarm.worker.serve.level_step_down import LevelStepDown, step_down_levels
from fluxfarm.worker.serve.lost_jobs import LostJobSweeper
from fluxfarm.worker.serve.metrics import WorkerMetrics, serve_metrics
from fluxfarm.worker.serve.periodic import Periodic
from fluxfarm.worker.serve.queue_adoption import CHECK_INTERVAL_S, LoraAdoption
from fluxfarm.worker.serve.result_store import ResultStore
from fluxfarm.worker.serve.retry_policy import SEND_DUE_INTERVAL_S, DelayedRetries, RetryPolicy
from fluxfarm.worker.serve.tasks import register_render_task

log = logging.getLogger("fluxfarm.worker")


def _quiet_library_progress_bars() -> None:
    """A worker log is read by people and tools: one line per event, no tqdm redraws."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


EXIT_STRANDED = 75
"""The worker's exit status when it lost its model (EX_TEMPFAIL: a restart loads it afresh)."""


def _consumed_queues(consumers: list[Consumer]) -> list[str]:
    """The queues Celery's consumer really reads now (empty before it is ready): what the fleet report's
    'unserved' check must see, whatever changed them."""
    if not consumers or consumers[0].task_consumer is None:
        return []
    return [queue.name for queue in list(consumers[0].task_consumer.queues)]


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
    app = make_celery_app(settings)
    broker_redis = open_redis(settings)  # thread-safe: heartbeat and task threads share it
    consumers: list[Consumer] = []  # Celery's consumer, once the worker is ready

    def change_queues(added: list[str], cancelled: list[str]) -> None:
        """Consume `added`, stop consuming `cancelled`: run in the consumer's own loop, as Celery's remote
        add_consumer / cancel_consumer commands do, but without a broadcast that a broker hiccup can lose."""
        consumer = consumers[0]
        for queue in added:
            consumer.call_soon(consumer.add_task_queue, queue)
        for queue in cancelled:
            consumer.call_soon(consumer.cancel_task_queue, queue)
        log.info("consuming %s (added %s, cancelled %s)", ", ".join(adoption.queues), added, cancelled)

    adoption = LoraAdoption(
        broker_redis,
        node,
        parse_level(engine.model.quant),
        lambda: batcher.engine.loras.active_id,
        change_queues,
        fleet_share=settings.lora_fleet_share,
        stint_max_s=settings.lora_stint_max_s,
    )
    log.info("consuming %s", ", ".join(adoption.queues))
    stepper = LevelStepDown(
        step_down_levels(settings, model, transformer, device),
        lambda level: load_engine(settings.model_copy(update={"quant": level.value}))[0],
        adoption.set_level,
        _exit_stranded,
    )
    batcher = RenderBatcher(engine, settings.max_batch, settings.batch_wait_s, stepper.step_down)
    book = DatasetBook(broker_redis)
    claims = JobClaims(broker_redis, node, settings.lease_s)
    results = ResultStore(store, settings.storage_retry_s)
    retries = RetryPolicy(
        broker_redis, book, node, settings.max_attempts, settings.retry_backoff_s, settings.retry_backoff_max_s
    )
    runner = JobRunner(batcher, results, book, claims, retries, worker_info, load_s, metrics)
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
            queues=_consumed_queues(consumers) or list(adoption.queues),
            lora_set=batcher.engine.loras.active_id,
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
        publish(app, broker_redis, [parse_job(sent.job)], sent.priority, sent.queued_at, sent.keep_result, record=False)

    sweep_s = max(10, settings.lease_s)
    sweeper = LostJobSweeper(
        broker_redis,
        book,
        resend,
        grace_s=2 * settings.lease_s,
        interval_s=sweep_s,
        retention_s=settings.dataset_retention_s,
    )
    sweeps = Periodic("fluxfarm-lost-jobs", sweep_s, sweeper.sweep_once).start()
    delayed = DelayedRetries(broker_redis, book, resend)
    due = Periodic("fluxfarm-retries", SEND_DUE_INTERVAL_S, delayed.send_due).start()
    adoptions = Periodic("fluxfarm-lora-queues", CHECK_INTERVAL_S, adoption.tick)

    def on_ready(sender: Consumer, **_: object) -> None:
        if sender.app is app and not consumers:
            consumers.append(sender)
            if settings.lora_jobs:  # queue changes go through the consumer: none before it runs
                adoptions.start()

    worker_ready.connect(on_ready, weak=False)
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={held_jobs(settings.max_batch)}",
                f"--hostname={node}",
                f"--queues={','.join(adoption.queues)}",
                f"--loglevel={settings.log_level}",
                "--task-events",
            ]
        )
    finally:
        adoptions.stop()
        due.stop()
        sweeps.stop()
        renewals.stop()
        heartbeat.stop(node)
        batcher.close()
