"""One job through the worker: validate again, skip if already stored, claim, render, store PNG then JSON.

The queue is not trusted, so the job is validated here too. A job whose metadata already exists is
not rendered again: redeliveries and resubmits return the stored result. A job claimed by another
live process is waited for, not rendered twice (worker/serve/leases.py). Attempts, back-off and dead
letters are the retry policy's (worker/serve/retry_policy.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from fluxfarm.shared import __version__
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import (
    InvalidJob,
    JobCancelled,
    JobConflict,
    JobDeadLettered,
    JobInputError,
    RenderAttemptFailed,
)
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.metadata import ImageInfo, RenderResult, Timings, WorkerInfo, gpu_seconds, png_object_metadata
from fluxfarm.shared.models import LEGACY_MODEL, FluxModel
from fluxfarm.shared.rates import RATE_WINDOW_S, per_hour
from fluxfarm.shared.storage import ResultKeys
from fluxfarm.worker.model.reproduction import reproduction
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.serve.calibration_cites import CalibrationCites
from fluxfarm.worker.serve.leases import JobClaims
from fluxfarm.worker.serve.metrics import Outcome, WorkerMetrics
from fluxfarm.worker.serve.redis_writes import REDIS_AWAY, unless_redis_is_down
from fluxfarm.worker.serve.result_store import ResultStore
from fluxfarm.worker.serve.retry_policy import RetryPolicy

log = logging.getLogger(__name__)

CLAIM_POLL_S = 1.0
"""How often a duplicate delivery looks for the result of the job another process is rendering."""
NOTED_LEVELS_MAX = 10_000
"""(dataset, level) pairs a worker remembers having recorded; past this many it starts over."""


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass
class RunnerStats:
    """Counters the heartbeat publishes; updated by the task threads under `lock`."""

    jobs_done: int = 0
    jobs_failed: int = 0
    images_rendered: int = 0
    """Jobs this worker rendered and stored (jobs_done also counts those it found already stored)."""
    current_job: str | None = None
    """The job most recently started (a worker may hold several at once)."""
    rendered_at: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=10_000), repr=False)
    """(time.monotonic(), GPU seconds) of each recent render (not of jobs found already stored); the GPU seconds
    are the job's share of its batch's encode and denoise, its decode and its adapter work."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _recent(self) -> tuple[list[tuple[float, float]], float]:
        now = time.monotonic()
        with self.lock:
            return [r for r in self.rendered_at if r[0] >= now - RATE_WINDOW_S], now

    def images_per_hour(self) -> float | None:
        """This worker's render rate over the last RATE_WINDOW_S, idle time included, so that it falls when the
        worker stalls or runs dry (None before its first image)."""
        recent, now = self._recent()
        return per_hour(len(recent), recent[0][0], now) if recent else None

    def busy_images_per_hour(self) -> float | None:
        """The rate while rendering: the last RATE_WINDOW_S's renders over the GPU seconds they took, so idle time
        (a short run, a queue that ran dry) does not lower what the card is shown to sustain (None before its
        first image)."""
        recent, _ = self._recent()
        busy_s = sum(gpu_s for _, gpu_s in recent)
        return len(recent) / busy_s * 3600 if busy_s > 0 else None


class JobRunner:
    """Holds the batcher, the store and this worker's facts; `run` is what each Celery task thread calls."""

    def __init__(
        self,
        batcher: RenderBatcher,
        results: ResultStore,
        book: DatasetBook,
        claims: JobClaims,
        retries: RetryPolicy,
        worker: WorkerInfo,
        load_s: float,
        metrics: WorkerMetrics,
        serves: FluxModel = LEGACY_MODEL,
        cites: CalibrationCites | None = None,
    ) -> None:
        self._batcher = batcher
        self._serves = serves
        self._cites = cites
        self._book = book
        self._claims = claims
        self._first_level = batcher.engine.model.level
        self._results = results
        self._store = results.store
        self._worker = worker
        self._retries = retries
        self._unreported_load_s = load_s
        self._load_lock = threading.Lock()
        self._metrics = metrics
        self.stats = RunnerStats()
        self._noted_levels: set[tuple[str, str]] = set()
        """(dataset, level) pairs this worker has recorded: each is added to the dataset's levels once."""

    def run(self, payload: Any, queued_at: Any = None) -> RenderResult:
        """Render one job message, counting it as done or failed for the fleet status and the metrics."""
        self._metrics.in_progress.inc()
        try:
            result = self._run(payload, queued_at)
        except (JobCancelled, RenderAttemptFailed, *REDIS_AWAY) as error:
            self._metrics.job_ended(self._level(), _outcome(error))
            raise  # dropped, or back in the queue (worker/serve/tasks.py): neither done nor failed yet
        except Exception as error:
            self._metrics.job_ended(self._level(), _outcome(error))
            with self.stats.lock:
                self.stats.jobs_failed += 1
            raise
        finally:
            self._metrics.in_progress.dec()
            with self.stats.lock:
                self.stats.current_job = None
        with self.stats.lock:
            self.stats.jobs_done += 1
        return result

    def _level(self) -> str:
        return self._batcher.engine.model.level

    def _run(self, payload: Any, queued_at: Any) -> RenderResult:
        job = parse_job(payload)
        with self.stats.lock:
            self.stats.current_job = job.id
        if job.model != self._serves:  # published past the queues (by hand, or a producer of another version)
            raise InvalidJob(f"job {job.id} is for {job.model.value}; this worker holds {self._serves.value}")
        level = self._batcher.engine.model.level
        if not job.constraint.allows(level):
            if job.constraint.allows(self._first_level):  # taken before this worker stepped down a level
                raise RenderAttemptFailed(f"job {job.id} needs {job.quant}; this worker stepped down to {level}")
            raise InvalidJob(f"job {job.id} needs {job.quant}; this worker holds {level}")
        keys = self._store.result_keys(job.dataset, job.id)
        if (stored := self._results.stored(keys)) is not None:
            return self._already_stored(job, keys, stored)
        if self._book.queued_for_another(job):  # published past the client's check
            raise _conflict(job, "queued")
        if (stored := self._claim(job, keys)) is not None:
            return self._already_stored(job, keys, stored)
        try:
            if (stored := self._results.stored(keys)) is not None:  # finished while we took the claim
                return self._already_stored(job, keys, stored)
            return self._attempt(job, keys, queued_at)
        finally:
            unless_redis_is_down(lambda: self._claims.release(job.dataset, job.id), "claim release")

    def _already_stored(self, job: RenderJob, keys: ResultKeys, stored: RenderResult) -> RenderResult:
        if stored.job != job:  # neither returned as this job's nor recorded: the dataset keeps its own
            raise _conflict(job, "stored")
        log.info("job %s is already stored at %s; not rendering it again", job.id, keys.metadata)
        self._metrics.job_ended(self._level(), "already_stored")
        self._mark_done(job, stored.quant)
        return stored

    def _mark_done(self, job: RenderJob, level: str, gpu_s: float = 0.0) -> None:
        """Record a stored job as done (with the GPU time it took, when this worker rendered it), releasing
        its claim where this worker holds it. Storage is the truth, so Redis being away must not fail a job
        that is stored: its message cannot be acknowledged then either, and its redelivery (found stored)
        records it."""
        record = f"job {job.id}'s record"
        noted = (job.dataset, level)
        new_level = level if noted not in self._noted_levels else None  # a dataset's levels are a set: once is enough
        owner = self._claims.owner if self._claims.holds(job.dataset, job.id) else None
        if unless_redis_is_down(lambda: self._book.mark_done(job.dataset, job.id, new_level, gpu_s, owner), record):
            if owner:
                self._claims.forget(job.dataset, job.id)
            if len(self._noted_levels) >= NOTED_LEVELS_MAX:
                self._noted_levels.clear()
            self._noted_levels.add(noted)

    def _claim(self, job: RenderJob, keys: ResultKeys) -> RenderResult | None:
        """Take the job's claim (None), or return its result once the claim's holder stores it."""
        announced = False
        while not self._claims.try_claim(job.dataset, job.id):
            if not announced:
                holder = self._claims.holder(job.dataset, job.id)
                log.info("job %s is being rendered by %s; waiting for its result", job.id, holder)
                announced = True
            time.sleep(CLAIM_POLL_S)
            if (stored := self._results.stored(keys)) is not None:
                return stored
        return None

    def _attempt(self, job: RenderJob, keys: ResultKeys, queued_at: Any) -> RenderResult:
        self._retries.begin(job)
        attempt: list[int] = []

        def count_attempt() -> None:  # on the render thread, as the render begins
            attempt.append(self._retries.count_start(job))

        try:
            result = self._render_and_store(job, keys, queued_at, count_attempt)
        except JobDeadLettered:  # out of attempts as its render was to begin: not a failed attempt
            raise
        except Exception as error:
            reason = _failure_reason(error, self._batcher.engine.model.level)
            number = attempt[0] if attempt else self._retries.started(job) + 1
            self._retries.failed(job, number, reason, input_error=isinstance(error, JobInputError))
        gpu_s = gpu_seconds(result.timings)
        with self.stats.lock:
            self.stats.rendered_at.append((time.monotonic(), gpu_s))
            self.stats.images_rendered += 1
        self._metrics.job_rendered(result)
        self._mark_done(job, result.quant, gpu_s)
        return result

    def _render_and_store(
        self, job: RenderJob, keys: ResultKeys, queued_at: Any, on_start: Callable[[], None]
    ) -> RenderResult:
        with self._load_lock:
            # Claimed with the start time under one lock, so the earliest job to start carries the load.
            started_at = datetime.now(UTC)
            load_s, self._unreported_load_s = self._unreported_load_s, 0.0
        rendered = self._batcher.render(job, on_start)
        model = rendered.model
        png_start = time.perf_counter()
        png = rendered.png  # encoded here, in this task's thread, while the GPU thread renders the next batch
        upload_start = time.perf_counter()

        def png_metadata() -> dict[str, str]:
            return png_object_metadata(job, model.info, model.level, __version__)

        self._results.put_image(keys, png, png_metadata())
        upload_s = time.perf_counter() - upload_start
        result = RenderResult(
            job_id=job.id,
            job=job,
            model=model.info,
            quant=model.level,
            loras=rendered.loras,
            controlnet=rendered.controlnet,
            input_images=rendered.input_images,
            worker=self._worker,
            timings=Timings(
                queued_at=_parse_time(queued_at),
                started_at=started_at,
                finished_at=datetime.now(UTC),
                load_s=load_s,
                encode_s=rendered.encode_s,
                denoise_s=rendered.denoise_s,
                decode_s=rendered.decode_s,
                png_s=upload_start - png_start,
                upload_s=upload_s,
                batch_size=rendered.batch_size,
                adapter_s=rendered.adapter_s,
            ),
            image=ImageInfo(
                key=keys.image,
                uri=self._store.uri(keys.image),
                sha256=hashlib.sha256(png).hexdigest(),
                bytes=len(png),
                width=rendered.width,
                height=rendered.height,
            ),
            metadata_key=keys.metadata,
            fluxfarm_version=__version__,
            calibration=self._cites.for_model(model) if self._cites is not None and model.pipe is not None else None,
            reproduction=(
                reproduction(model, rendered.batch_size, rendered.batch_position) if model.pipe is not None else None
            ),
        )
        # The JSON goes last: its existence is what marks the job done.
        result = self._results.put_result(keys, result, png, png_metadata)
        log.info(
            "rendered job %s (%s, %dx%d, %d steps) encode %.2fs denoise %.2fs decode %.2fs upload %.2fs",
            job.id,
            job.dataset,
            job.width,
            job.height,
            job.steps,
            rendered.encode_s,
            rendered.denoise_s,
            rendered.decode_s,
            upload_s,
        )
        return result


def _conflict(job: RenderJob, where: str) -> JobConflict:
    log.warning("job %s of %s refused: its id names another %s job of the dataset", job.id, job.dataset, where)
    return JobConflict.naming(job.dataset, job.id, where)


def _outcome(error: Exception) -> Outcome:
    """The metrics' name for how a job that raised `error` left the worker."""
    if isinstance(error, JobCancelled):
        return "cancelled"
    if isinstance(error, (RenderAttemptFailed, *REDIS_AWAY)):
        return "retried"  # the message goes back to its queue
    if isinstance(error, InvalidJob):
        return "refused"
    if isinstance(error, JobDeadLettered):
        return "dead_lettered"
    return "failed"  # an error outside any attempt (storage unreachable): Celery fails the task


def _failure_reason(error: BaseException, level: str) -> str:
    """What the dataset record and the dead letter say about a failed attempt."""
    if isinstance(error, torch.OutOfMemoryError):
        return f"GPU out of memory rendering this job alone at level {level} ({error})"
    if isinstance(error, JobInputError):
        return str(error)
    return f"{type(error).__name__}: {error}"
