"""A running worker in one object: what it holds (engine, batcher, job runner) and the duties beside the
renders, started in a stated order and stopped in reverse.

Start order, each duty relying on those before it:
1. the heartbeat: the fleet sees the worker (and its queues) before it takes a job;
2. lease renewals: a job taken must keep its lease from its first second;
3. the lost-job sweep and 4. the delayed retries: they publish jobs again, which the worker may take;
5. the LoRA-queue adoption, once Celery's consumer is ready (queue changes go through it).
Stopping reverses it: no queue changes, then nothing sent again, then the leases, and the heartbeat
last, so the fleet sees the worker until it does nothing; the batcher closes after every duty.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn, Protocol

import redis
import torch
from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer import Consumer

from fluxfarm.shared.celery_app import lease_renew_interval_s
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.fleet import WorkerStatus
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.shared.periodic import Periodic
from fluxfarm.shared.publish import publish
from fluxfarm.shared.queue_registry import QueueNews
from fluxfarm.shared.storage import ObjectStore
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.gpu import compute_capability, vram_peak_bytes
from fluxfarm.worker.render.batcher import RenderBatcher, held_jobs
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.serve.calibration_cites import CalibrationCites
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.heartbeat import Heartbeat
from fluxfarm.worker.serve.job_runner import JobRunner
from fluxfarm.worker.serve.leases import InFlight, JobClaims, LeaseKeeper
from fluxfarm.worker.serve.level_step_down import LevelStepDown, step_down_levels
from fluxfarm.worker.serve.lost_jobs import LostJobSweeper
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.serve.queue_adoption import CHECK_INTERVAL_S, TENANT_CHECK_INTERVAL_S, QueueAdoption
from fluxfarm.worker.serve.result_store import ResultStore
from fluxfarm.worker.serve.retry_policy import SEND_DUE_INTERVAL_S, DelayedRetries, RetryPolicy
from fluxfarm.worker.serve.tasks import register_render_task
from fluxfarm.worker.serve.thread_pool import POOL

_CANCEL_NOTICE = r"\s*In Celery 5\.1 we introduced an optional breaking change"
"""The start of the notice Celery warns with, at each lost connection, where the cancelling is off: it is off on
purpose here (WorkerRuntime.__init__), so the notice is noise in a worker's log."""

log = logging.getLogger(__name__)


def _leave_if_unhashable(engine: RenderEngine, on_stranded: Callable[[str], NoReturn]) -> RenderEngine:
    """The weights are hashed beside the load and the first render (LoadedWeights): if that fails, no image's
    record can be written, so the worker leaves as one with no model does."""
    engine.model.weights.on_failure(lambda error: on_stranded(f"could not hash the loaded weights: {error}"))
    return engine


class Duty(Protocol):
    name: str

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Duties:
    """Duties started in the order given, stopped in reverse; only those started are stopped."""

    def __init__(self, *duties: Duty) -> None:
        self._duties = duties
        self._started: list[Duty] = []

    def start(self, *names: str) -> None:
        """Start the duties named (all not yet started when none is named), in their order."""
        for duty in self._duties:
            if duty not in self._started and (not names or duty.name in names):
                duty.start()
                self._started.append(duty)

    def stop(self) -> None:
        while self._started:
            self._started.pop().stop()

    @property
    def names(self) -> list[str]:
        return [duty.name for duty in self._duties]

    @property
    def running(self) -> list[str]:
        """The duties started, in the order they started."""
        return [duty.name for duty in self._started]


class WorkerRuntime:
    """Assembles a worker around its loaded engine; `start`, `consumer_ready` and `stop` run its duties."""

    def __init__(
        self,
        app: Celery,
        client: redis.Redis,
        store: ObjectStore,
        loader: EngineLoader,
        worker: WorkerInfo,
        metrics: WorkerMetrics,
        metrics_url: str | None,
        on_stranded: Callable[[str], NoReturn],
    ) -> None:
        settings = loader.settings
        self.app = app
        self._settings = settings
        self._worker = worker
        self._consumer: Consumer | None = None
        self._started_at = datetime.now(UTC)
        self._capability = compute_capability(loader.device)
        self._metrics_url = metrics_url
        engine, load_s = loader.load()
        _leave_if_unhashable(engine, on_stranded)
        self._flux_model = loader.flux_model
        self.adoption = QueueAdoption(
            client,
            worker.node,
            loader.flux_model,
            engine.model.level,
            self._active_lora_set,
            self._change_queues,
            fleet_share=settings.lora_fleet_share,
            stint_max_s=settings.lora_stint_max_s,
        )
        self._queue_news = QueueNews(client)
        stepper = LevelStepDown(
            step_down_levels(settings, loader.model, loader.transformer, loader.device),
            lambda level: _leave_if_unhashable(
                loader.load(settings.model_copy(update={"level": level}))[0], on_stranded
            ),
            self.adoption.set_level,
            on_stranded,
        )
        self.batcher = RenderBatcher(
            engine, settings.max_batch, settings.batch_wait_s, stepper.step_down, loader.warm_start.after_batch
        )
        book = DatasetBook(client)
        claims = JobClaims(client, worker.node, settings.lease_s)
        retries = RetryPolicy(
            client, book, worker.node, settings.max_attempts, settings.retry_backoff_s, settings.retry_backoff_max_s
        )
        results = ResultStore(store, settings.storage_retry_s)
        self.runner = JobRunner(
            self.batcher,
            results,
            book,
            claims,
            retries,
            worker,
            load_s,
            metrics,
            serves=loader.flux_model,
            cites=CalibrationCites(client),
        )
        in_flight = InFlight()
        register_render_task(app, self.runner, in_flight)
        app.conf.worker_pool = POOL  # threads; `celery worker` takes it when no --pool is given
        # A lost connection leaves the renders in flight running: a thread cannot be cancelled (Celery would log a
        # traceback a job trying), and each render finishes and stores its image, which its redelivery then finds.
        app.conf.worker_cancel_long_running_tasks_on_connection_loss = False

        def resend(sent: SentJob) -> None:
            job = parse_job(sent.job)
            publish(
                app, client, [job], sent.priority, sent.queued_at, sent.keep_result, tenant=sent.tenant, record=False
            )

        sweep_s = max(10, settings.lease_s)
        sweeper = LostJobSweeper(
            client, book, resend, 2 * settings.lease_s, sweep_s, retention_s=settings.dataset_retention_s
        )
        leases = LeaseKeeper(client, claims, in_flight)
        self.duties = Duties(
            Heartbeat(client, worker.node, self._snapshot),
            Periodic("fluxfarm-leases", lease_renew_interval_s(settings.lease_s), leases.renew_once),
            Periodic("fluxfarm-lost-jobs", sweep_s, sweeper.sweep_once),
            Periodic("fluxfarm-retries", SEND_DUE_INTERVAL_S, DelayedRetries(client, book, resend).send_due),
            Periodic("fluxfarm-tenant-queues", 0.0, self._follow_tenants),
            Periodic("fluxfarm-lora-queues", CHECK_INTERVAL_S, self.adoption.tick),
        )

    def celery_argv(self) -> list[str]:
        """`celery worker`'s arguments: a thread per held job (the pool of worker/serve/thread_pool.py, set as
        `worker_pool`), the adopted queues, task events on (Flower's view), and neither mingle nor gossip:
        mingle's start-up exchange with the other workers (revoked ids and clocks; the farm revokes nothing
        through Celery) cost every worker a second before its first job (run 12), and gossip has each worker
        follow every other's events, a cost that grows with the fleet squared while the farm's own heartbeats
        (shared/fleet.py) say who is alive."""
        return [
            "worker",
            f"--concurrency={held_jobs(self._settings.max_batch)}",
            f"--hostname={self._worker.node}",
            f"--queues={','.join(self.adoption.queues)}",
            f"--loglevel={self._settings.log_level}",
            "--task-events",
            "--without-mingle",
            "--without-gossip",
        ]

    def start(self) -> None:
        """Every duty but the queue changes (tenant and LoRA queues), which wait for Celery's consumer."""
        self.duties.start("fluxfarm-heartbeat", "fluxfarm-leases", "fluxfarm-lost-jobs", "fluxfarm-retries")

    def consumer_ready(self, consumer: Consumer) -> None:
        if self._consumer is None:
            self._consumer = consumer
            # Here, not before: Celery's logging setup puts its "always" filter for this category first.
            warnings.filterwarnings("ignore", message=_CANCEL_NOTICE, category=CPendingDeprecationWarning)
            self.duties.start("fluxfarm-tenant-queues")
            if self._settings.lora_jobs:  # queue changes go through the consumer: none before it runs
                self.duties.start("fluxfarm-lora-queues")

    def stop(self) -> None:
        self.duties.stop()
        self._queue_news.close()
        self.batcher.close()

    def _follow_tenants(self) -> None:
        """Take up tenant queues as they are announced, or once a TENANT_CHECK_INTERVAL_S without news."""
        self._queue_news.wait(TENANT_CHECK_INTERVAL_S)
        self.adoption.follow_tenants()

    def _active_lora_set(self) -> str | None:
        return self.batcher.engine.loras.active_id

    def _consumed_queues(self) -> list[str]:
        """The queues Celery's consumer really reads now (empty before it is ready): what the fleet
        report's 'unserved' check must see, whatever changed them."""
        if self._consumer is None or self._consumer.task_consumer is None:
            return []
        return [queue.name for queue in list(self._consumer.task_consumer.queues)]

    def _change_queues(self, added: list[str], cancelled: list[str]) -> None:
        """Consume `added`, stop consuming `cancelled`: run in the consumer's own loop, as Celery's remote
        add_consumer / cancel_consumer commands do, but without a broadcast that a broker hiccup can lose."""
        consumer = self._consumer
        assert consumer is not None, "queue changes start once the consumer is ready"
        for queue in added:
            consumer.call_soon(consumer.add_task_queue, queue)
        for queue in cancelled:
            consumer.call_soon(consumer.cancel_task_queue, queue)
        log.info("consuming %s (added %s, cancelled %s)", ", ".join(self.adoption.queues), added, cancelled)

    def _snapshot(self) -> WorkerStatus:
        engine, stats = self.batcher.engine, self.runner.stats
        return WorkerStatus(
            node=self._worker.node,
            hostname=self._worker.hostname,
            device=self._worker.device,
            gpu_name=self._worker.gpu_name,
            vram_gib=self._worker.vram_gib,
            level=engine.model.level,
            model=engine.model.weights.model_id,
            flux_model=self._flux_model,
            queues=self._consumed_queues() or list(self.adoption.queues),
            lora_set=engine.loras.active_id,
            started_at=self._started_at,
            last_seen=self._started_at,
            jobs_done=stats.jobs_done,
            jobs_failed=stats.jobs_failed,
            images_rendered=stats.images_rendered,
            images_per_hour=stats.images_per_hour(),
            busy_images_per_hour=stats.busy_images_per_hour(),
            current_job=stats.current_job,
            compute_capability=self._capability,
            vram_budget_gib=self._settings.vram_budget_gib,
            vram_peak_gib=round(vram_peak_bytes(self._worker.device) / GIB, 2) if self._capability else None,
            torch_version=torch.__version__,
            metrics_url=self._metrics_url,
        )
