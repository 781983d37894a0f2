"""One job through the worker: validate again, skip if already stored, render, store PNG then JSON.

The queue is not trusted, so the job is validated here too. A job whose metadata already exists is
not rendered again: redeliveries and resubmits return the stored result.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from shared import __version__
from shared.datasets import DatasetBook
from shared.errors import InvalidJob, JobCancelled, ObjectNotFound
from shared.jobs import RenderJob, parse_job
from shared.ladder import parse_level
from shared.metadata import ImageInfo, RenderResult, Timings, WorkerInfo, png_object_metadata, read_result
from shared.rates import RATE_WINDOW_S, per_hour
from shared.storage import JSON_CONTENT_TYPE, PNG_CONTENT_TYPE, ObjectStore, ResultKeys
from worker.batcher import RenderBatcher

log = logging.getLogger(__name__)


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
    rendered_at: deque[float] = field(default_factory=lambda: deque(maxlen=10_000), repr=False)
    """time.monotonic() of each recent render (not of jobs found already stored)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def images_per_hour(self) -> float | None:
        """This worker's render rate over the last RATE_WINDOW_S (None before its first image)."""
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.rendered_at if t >= now - RATE_WINDOW_S]
        return per_hour(len(recent), recent[0], now) if recent else None


class JobRunner:
    """Holds the batcher, the store and this worker's facts; `run` is what each Celery task thread calls."""

    def __init__(
        self, batcher: RenderBatcher, store: ObjectStore, book: DatasetBook, worker: WorkerInfo, load_s: float
    ) -> None:
        self._batcher = batcher
        self._book = book
        self._model = batcher.engine.model
        self._store = store
        self._worker = worker
        self._unreported_load_s = load_s
        self._load_lock = threading.Lock()
        self.stats = RunnerStats()

    def _stored_result(self, keys: ResultKeys) -> RenderResult | None:
        try:
            return read_result(self._store, keys)
        except ObjectNotFound:
            return None
        except ValidationError:
            log.warning("stored metadata %s is unreadable; rendering the job again", keys.metadata)
            return None

    def run(self, payload: Any, queued_at: Any = None) -> RenderResult:
        """Render one job message, counting it as done or failed for the fleet status."""
        try:
            result = self._run(payload, queued_at)
        except JobCancelled:
            raise  # dropped, neither done nor failed
        except Exception:
            with self.stats.lock:
                self.stats.jobs_failed += 1
            raise
        finally:
            with self.stats.lock:
                self.stats.current_job = None
        with self.stats.lock:
            self.stats.jobs_done += 1
        return result

    def _run(self, payload: Any, queued_at: Any) -> RenderResult:
        job = parse_job(payload)
        with self.stats.lock:
            self.stats.current_job = job.id
        level = self._model.quant
        if not job.constraint.allows(parse_level(level)):
            raise InvalidJob(f"job {job.id} needs {job.quant}; this worker holds {level}")
        keys = self._store.result_keys(job.dataset, job.id)
        if (stored := self._stored_result(keys)) is not None:
            log.info("job %s is already stored at %s; not rendering it again", job.id, keys.metadata)
            self._book.mark_done(job.dataset, job.id, stored.quant)
            return stored
        if self._book.is_cancelled(job.dataset, job.id):
            log.info("job %s: dataset %s was cancelled; dropping it without rendering", job.id, job.dataset)
            raise JobCancelled(f"dataset {job.dataset} was cancelled before job {job.id} started")
        self._book.mark_running(job.dataset, job.id)
        try:
            result = self._render_and_store(job, keys, queued_at)
        except Exception as error:
            self._book.mark_failed(job.dataset, job.id, f"{type(error).__name__}: {error}")
            raise
        with self.stats.lock:
            self.stats.rendered_at.append(time.monotonic())
            self.stats.images_rendered += 1
        self._book.mark_done(job.dataset, job.id, result.quant)
        return result

    def _render_and_store(self, job: RenderJob, keys: ResultKeys, queued_at: Any) -> RenderResult:
        with self._load_lock:
            # Claimed with the start time under one lock, so the earliest job to start carries the load.
            started_at = datetime.now(UTC)
            load_s, self._unreported_load_s = self._unreported_load_s, 0.0
        rendered = self._batcher.render(job)
        model = self._model
        png_start = time.perf_counter()
        png = rendered.png  # encoded here, in this task's thread, while the GPU thread renders the next batch
        upload_start = time.perf_counter()
        self._store.put(
            keys.image,
            png,
            PNG_CONTENT_TYPE,
            png_object_metadata(job, model.info, model.quant, __version__),
        )
        upload_s = time.perf_counter() - upload_start
        result = RenderResult(
            job_id=job.id,
            job=job,
            model=model.info,
            quant=model.quant,
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
        )
        # The JSON goes last: its existence is what marks the job done.
        self._store.put(keys.metadata, result.model_dump_json(indent=2).encode(), JSON_CONTENT_TYPE)
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
