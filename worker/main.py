"""`fluxfarm worker`: load the pipeline once, then consume render jobs.

Celery's threads pool holds two batches of jobs (2 x FLUXFARM_MAX_BATCH), one task thread each; the
RenderBatcher's single render thread renders them a batch at a time while the other batch's threads
encode and store their PNGs (worker/batcher.py)."""

from __future__ import annotations

import logging
import socket
import time
from datetime import UTC, datetime

import redis

from shared.celery_app import make_celery_app
from shared.datasets import DatasetBook
from shared.fleet import WorkerStatus
from shared.ladder import parse_level
from shared.routing import queues_for_level
from shared.settings import FarmSettings, redact_url
from shared.storage import open_store
from worker.batcher import RenderBatcher, held_jobs
from worker.engine import RenderEngine
from worker.gpu import cap_memory, default_device, probe_device
from worker.heartbeat import Heartbeat
from worker.job_runner import JobRunner
from worker.loadout import choose_loadout
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
    loadout = choose_loadout(settings, model, transformer, device)
    if loadout.plan is not None:
        log.info("plan: %s", loadout.plan.model_dump_json())
    load_start = time.perf_counter()
    loaded = load_model(
        model,
        loadout.transformer,
        device,
        settings,
        level=loadout.level,
        text_encoders=loadout.text_encoders,
        vae_tiling=loadout.vae_tiling,
        transformer_path=loadout.transformer_path,
    )
    load_s = time.perf_counter() - load_start
    queues = queues_for_level(parse_level(loaded.quant))
    log.info("model loaded in %.2fs: %s, level %s", load_s, loaded.info.transformer, loaded.quant)
    log.info("consuming %s", ", ".join(queues))
    engine = RenderEngine(loaded, max_batch=settings.max_batch, embedding_cache=settings.embedding_cache)
    batcher = RenderBatcher(engine, max_jobs=settings.max_batch, wait_s=settings.batch_wait_s)
    broker_redis = redis.Redis.from_url(settings.broker_url)  # thread-safe: heartbeat and task threads share it
    book = DatasetBook(broker_redis)
    runner = JobRunner(batcher, store, book, worker_info, load_s)
    started_at = datetime.now(UTC)

    def snapshot() -> WorkerStatus:
        return WorkerStatus(
            node=node,
            hostname=worker_info.hostname,
            device=device,
            gpu_name=worker_info.gpu_name,
            vram_gib=worker_info.vram_gib,
            level=loaded.quant,
            model=loaded.info.id,
            queues=queues,
            started_at=started_at,
            last_seen=started_at,
            jobs_done=runner.stats.jobs_done,
            jobs_failed=runner.stats.jobs_failed,
            images_rendered=runner.stats.images_rendered,
            images_per_hour=runner.stats.images_per_hour(),
            current_job=runner.stats.current_job,
        )

    app = make_celery_app(settings)
    register_render_task(app, runner)
    heartbeat = Heartbeat(broker_redis, snapshot).start()
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
        heartbeat.stop(node)
        batcher.close()
