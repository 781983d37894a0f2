"""The Python client: submit render jobs to the farm and wait for their results.

    client = FarmClient.from_env()
    handle = client.submit({"prompt": "a red fox in the snow", "seed": 7})
    result = handle.result(timeout=600)          # RenderResult: the stored metadata
    for done in client.submit_many(jobs).as_completed():
        print(done.result().image.uri)
    for outcome in client.as_completed(dataset="moths"):   # a whole dataset, however it was submitted
        print(outcome.job_id, outcome.result.image.uri if outcome.result else outcome.failure)

A job already in storage is not sent again: its handle is complete at once (`handle.cached`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Self

import redis
from celery import states
from pydantic import BaseModel, ValidationError

from fluxfarm.producer.dataset_stream import DatasetOutcome, stream_outcomes
from fluxfarm.producer.job_handles import JobBatch, JobHandle, owned_result
from fluxfarm.producer.job_inputs import InputStager
from fluxfarm.producer.redis_room import RedisFull, RedisRoom, Room
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.adapters import MAX_CONTROL_IMAGE_BYTES, image_type
from fluxfarm.shared.celery_app import (
    PRIORITY_STEPS,
    Priority,
    make_celery_app,
    task_id,
)
from fluxfarm.shared.datasets import DatasetBook, DatasetRecord
from fluxfarm.shared.errors import InvalidJob, JobConflict, ObjectNotFound
from fluxfarm.shared.fleet import FleetReport, fleet_report
from fluxfarm.shared.jobs import DEFAULT_DATASET, RenderJob, parse_dataset_name, parse_job, parse_jobs
from fluxfarm.shared.metadata import RenderResult, read_result
from fluxfarm.shared.publish import PublishRefused, publish
from fluxfarm.shared.redis_conn import open_redis
from fluxfarm.shared.routing import parse_tenant
from fluxfarm.shared.storage import JSON_CONTENT_TYPE, open_store

ROOM_POLL_S = 2.0
"""How often a submit waiting for room in Redis looks again."""
LOOKUP_EACH_MAX = 64
"""A submit of at most this many jobs (a list) asks about each job (a set lookup and a storage HEAD), not
about the whole dataset (every id it has queued, one listing of all it has stored), whose cost grows with
the dataset: a single-job POST to the gateway must not list a 100,000-image dataset."""


JobOutcome = Literal["enqueued", "stored", "waiting"]
"""What a submit did with one job: sent it, or found it already stored, or already queued or running."""


class StreamCounts(BaseModel):
    """What `FarmClient.submit_stream` did with the jobs it was given."""

    enqueued: int = 0
    already_stored: int = 0
    already_waiting: int = 0
    """Queued or running already (per the dataset record), or repeated earlier in the same stream."""

    @property
    def seen(self) -> int:
        return self.enqueued + self.already_stored + self.already_waiting


class FarmClient:
    """Submits jobs to the farm's Redis queue and reads results from its storage."""

    def __new__(cls, settings: ProducerSettings | None = None) -> FarmClient:
        """With FLUXFARM_API_URL set, the client talks to the gateway (producer/http_client.py), holding no
        Redis or S3 credentials; otherwise to Redis and storage directly."""
        if cls is FarmClient and (settings or ProducerSettings()).api_url:
            from fluxfarm.producer.http_client import HttpFarmClient

            return super().__new__(HttpFarmClient)
        return super().__new__(cls)

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        self._app = make_celery_app(self.settings)
        self.store = open_store(self.settings)
        """Where the images and their metadata are."""
        self._inputs = InputStager(self.store)
        self._redis = open_redis(self.settings)
        self.datasets = DatasetBook(self._redis)
        """The dataset records in the broker's Redis (what is queued, running, done, failed)."""
        self.tenant = self.settings.tenant
        """The fair-share tenant whose queues this client's jobs go to (shared/routing.py); None: the shared ones."""

    def for_tenant(self, tenant: str) -> FarmClient:
        """This client, sending its jobs to `tenant`'s queues: a view that shares its connections (the
        gateway takes one per token, so each token's jobs take turns with the others')."""
        view = copy.copy(self)
        view.tenant = parse_tenant(tenant)
        return view

    @property
    def redis(self) -> redis.Redis:
        """The farm's Redis (the broker's), which the client's parts share: one connection pool."""
        return self._redis

    @classmethod
    def from_env(cls) -> FarmClient:
        """A client configured from `FLUXFARM_*` variables (and `.env`)."""
        return cls(ProducerSettings())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._app.close()
        self.datasets.close()

    def stored_result(self, job: RenderJob) -> RenderResult | None:
        """The stored metadata of `job`, or None when it has not been rendered; JobConflict when its id
        holds another job's result."""
        keys = self.store.result_keys(job.dataset, job.id)
        try:
            return owned_result(job, read_result(self.store, keys))
        except (ObjectNotFound, ValidationError):
            return None

    def _check_queued(self, job: RenderJob) -> None:
        if self.datasets.queued_for_another(job):
            raise JobConflict.naming(job.dataset, job.id, "queued")

    def store_input(self, data: bytes, dataset: str = DEFAULT_DATASET) -> str:
        """Store a control image (PNG, JPEG or WebP, at most 16 MiB) for jobs of `dataset` and return the
        `sha256:<hex>` their `controlnet.control_image` names it by: an image too large to send inline, or
        one many jobs share, is uploaded once and never travels through Redis."""
        parse_dataset_name(dataset)
        kind = image_type(data)
        if kind is None:
            raise InvalidJob("a control image must be a PNG, JPEG or WebP file")
        if len(data) > MAX_CONTROL_IMAGE_BYTES:
            raise InvalidJob(f"a control image must be at most {MAX_CONTROL_IMAGE_BYTES >> 20} MiB")
        return self._inputs.store(dataset, data, kind)

    def image_url(self, result: RenderResult, expires_s: int = 3600) -> str:
        """A URL that fetches the result's PNG without credentials for `expires_s` (presigned on S3)."""
        return self.store.share_url(result.image.key, expires_s)

    def as_completed(
        self,
        dataset: str,
        timeout: float | None = None,
        with_results: bool = True,
        on_poll: Callable[[DatasetRecord], None] | None = None,
    ) -> Iterator[DatasetOutcome]:
        """Yield each of `dataset`'s jobs as it finishes, until none is queued or running (jobs finished
        before the call come first). Works for jobs sent by any producer, `submit_stream` included: it
        reads the dataset record, not Celery results. TimeoutError past `timeout` seconds."""
        return stream_outcomes(self, dataset, timeout, with_results, on_poll)

    def dataset_record(self, dataset: str) -> DatasetRecord:
        """The dataset's progress now: counts, rate, ETA, failures."""
        return self.datasets.record(dataset)

    def finished_since(self, dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]:
        """(job id, finishing time) of the dataset's jobs done at or after `since` (Redis' clock), oldest
        first, at most `limit`."""
        return self.datasets.finished_since(dataset, since, limit)

    def cancel(self, dataset: str) -> int:
        """Drop the dataset's queued jobs (running ones finish); returns how many were dropped."""
        return self.datasets.cancel(dataset)

    def dataset_names(self) -> list[str]:
        """The active datasets (through the gateway: those the token may see)."""
        return self.datasets.names()

    def fleet(self) -> FleetReport:
        """The live workers and the queues, unserved ones marked."""
        return fleet_report(self._redis)

    def store_manifest(self, record: DatasetRecord) -> None:
        """Write the dataset's record beside its images (`ObjectStore.manifest_key`), so storage alone tells
        what it is when Redis is gone (a client through the gateway leaves this to the gateway, which writes
        it at each upload)."""
        key = self.store.manifest_key(record.name)
        self.store.put(key, record.model_dump_json(indent=2).encode(), JSON_CONTENT_TYPE)

    def dataset_result(self, dataset: str, job_id: str) -> RenderResult | None:
        """The stored metadata of a job known by its dataset and id; None while it is not stored."""
        try:
            return read_result(self.store, self.store.result_keys(dataset, job_id))
        except (ObjectNotFound, ValidationError):
            return None

    def submit(self, job: RenderJob | Mapping[str, Any], priority: Priority = "normal") -> JobHandle:
        """Validate and enqueue one job; a job already stored returns its stored result instead.
        A `high` job is served before every `normal` and `low` one still waiting."""
        return self._submit_valid(self._as_sent(job), priority)

    def submit_many(self, jobs: Iterable[RenderJob | Mapping[str, Any]], priority: Priority = "normal") -> JobBatch:
        """Validate every job first (nothing is enqueued if any is invalid), then enqueue them all."""
        valid = parse_jobs(jobs, self.settings.default_model)
        return JobBatch(self._app, [self._submit_valid(self._inputs.stage(job), priority) for job in valid])

    def submit_stream(
        self,
        jobs: Iterable[RenderJob | Mapping[str, Any]],
        on_progress: Callable[[StreamCounts], None] | None = None,
        priority: Priority = "normal",
        wait_for_room: bool = False,
        on_wait: Callable[[Room], None] | None = None,
        on_outcome: Callable[[RenderJob, JobOutcome], object] | None = None,
    ) -> StreamCounts:
        """Enqueue a stream of jobs of any length, for datasets: constant memory beyond one id per job of
        the datasets touched, and thousands of jobs a second.

        Jobs already stored (one storage listing per dataset, no request per job; for a list of at most
        LOOKUP_EACH_MAX jobs, a request per job) or queued or running (the dataset record) are skipped,
        so resubmitting after a crash sends only what is missing.
        Messages go out in pipelined chunks of `FLUXFARM_SUBMIT_CHUNK` and keep no Celery result:
        results of a stream are read from storage and the dataset record (`fluxfarm wait`, `stored_result`).

        Each chunk is sent only if it fits under Redis' maxmemory (producer/redis_room.py): past it the
        stream sends what fits and raises RedisFull, or with `wait_for_room` waits for the fleet to drain
        (`on_wait` is told each time it looks). `on_outcome` hears what became of each job.
        """
        counts = StreamCounts()
        sent: Iterable[RenderJob]
        if isinstance(jobs, Sequence) and len(jobs) <= LOOKUP_EACH_MAX:
            sent = [self._as_sent(item) for item in jobs]
            known = self._look_up_each(sent)
        else:
            sent = (self._as_sent(item) for item in jobs)
            known = {}
        room = RedisRoom.of(self._redis, self.settings)
        named: dict[tuple[str, str], RenderJob] = {}
        """Named jobs sent by this stream, to tell a repeated row from another job under the same name."""
        chunk: list[RenderJob] = []
        with self._app.producer_or_acquire() as producer:
            for job in sent:
                if job.dataset not in known:
                    # Waiting first, then stored: a job that finishes in between is still in one of the two.
                    # (Listing storage first missed a job stored just after the listing and marked done
                    # just before the record was read, and sent it again.)
                    waiting_ids = self.datasets.waiting_ids(job.dataset)
                    known[job.dataset] = (self.store.stored_job_ids(job.dataset), waiting_ids)
                stored, waiting = known[job.dataset]
                outcome: JobOutcome = "enqueued"
                if job.id in stored:
                    if job.named:
                        self.stored_result(job)  # JobConflict if another job's result holds the name
                    counts.already_stored += 1
                    outcome = "stored"
                elif job.id in waiting:
                    if job.named and (earlier := named.get((job.dataset, job.id))) is not None:
                        if earlier != job:
                            raise JobConflict.naming(job.dataset, job.id, "earlier in this stream")
                    elif job.named:
                        self._check_queued(job)
                    counts.already_waiting += 1
                    outcome = "waiting"
                else:
                    waiting.add(job.id)
                    if job.named:
                        named[(job.dataset, job.id)] = job
                    chunk.append(job)
                if on_outcome is not None:
                    on_outcome(job, outcome)
                if len(chunk) >= self.settings.submit_chunk:
                    self._admit(producer, chunk, priority, counts, room, wait_for_room, on_wait)
                    chunk = []
                    if on_progress is not None:
                        on_progress(counts)
            if chunk:
                self._admit(producer, chunk, priority, counts, room, wait_for_room, on_wait)
        if on_progress is not None:
            on_progress(counts)
        return counts

    def _as_sent(self, item: RenderJob | Mapping[str, Any]) -> RenderJob:
        """A job as it is sent: validated, with the default model if it names none, its inputs staged."""
        job = parse_job(dict(item) if isinstance(item, Mapping) else item, self.settings.default_model)
        return self._inputs.stage(job)

    def _look_up_each(self, jobs: list[RenderJob]) -> dict[str, tuple[set[str], set[str]]]:
        """For a few jobs: per dataset, which of them are stored and which queued or running, asked job by
        job. Waiting first, then stored, as submit_stream lists them (a job finishing in between is in one)."""
        ids: dict[str, list[str]] = {}
        for job in jobs:
            ids.setdefault(job.dataset, []).append(job.id)
        known: dict[str, tuple[set[str], set[str]]] = {}
        for dataset, among in ids.items():
            waiting = self.datasets.waiting_ids(dataset, among)
            stored = {job_id for job_id in among if self.store.exists(self.store.result_keys(dataset, job_id).metadata)}
            known[dataset] = (stored, waiting)
        return known

    def _admit(
        self,
        producer: Any,
        chunk: list[RenderJob],
        priority: Priority,
        counts: StreamCounts,
        room: RedisRoom,
        wait_for_room: bool,
        on_wait: Callable[[Room], None] | None,
    ) -> None:
        """Send `chunk` if it fits under Redis' maxmemory; else send what fits and raise RedisFull, or (with
        `wait_for_room`) send what fits as room comes, while something queued or running can free it."""
        while True:
            now = room.now()
            fits = now.jobs
            if fits is None or fits >= len(chunk):
                break
            if fits:
                self._publish(producer, chunk[:fits], priority, counts)
                room.measured(now, fits)
                chunk = chunk[fits:]
            if not wait_for_room:
                raise self._full(counts, room.now(), room.drains())
            if not room.drains():
                # Nothing left to drain: a last look, since the last job's end may have freed room since.
                last = room.now()
                if last.jobs:
                    continue
                raise self._full(counts, last, drains=False)
            if on_wait is not None:
                on_wait(now)
            time.sleep(ROOM_POLL_S)
        self._publish(producer, chunk, priority, counts)
        room.measured(now, len(chunk))

    @staticmethod
    def _full(counts: StreamCounts, now: Room, drains: bool) -> RedisFull:
        """The one-line error of a submit stopped by a full Redis, saying whether waiting can help."""
        stopped = f"Redis is full: this submit queued {counts.enqueued} jobs and stopped ({now.describe()})"
        if not drains:
            return RedisFull(
                f"{stopped}. Nothing is queued or running whose end would free room, so waiting cannot help: "
                "raise maxmemory, then submit again: only what is missing is sent",
                drains=False,
            )
        return RedisFull(
            f"{stopped}. Raise maxmemory, or let the fleet drain (--wait-for-room), then submit again: only what "
            "is missing is sent"
        )

    def _publish(self, producer: Any, jobs: list[RenderJob], priority: Priority, counts: StreamCounts) -> None:
        """Publish a chunk (shared/publish.py: the record first, then one round trip for the messages)."""
        queued_at = datetime.now(UTC).isoformat()
        try:
            step = PRIORITY_STEPS[priority]
            publish(self._app, self._redis, jobs, step, queued_at, False, tenant=self.tenant, producer=producer)
        except PublishRefused as error:
            raise RedisFull(
                f"{error}; this submit queued {counts.enqueued} jobs. Raise maxmemory or let the fleet drain, "
                "then submit again: only what is missing is sent"
            ) from None
        counts.enqueued += len(jobs)

    def _submit_valid(self, job: RenderJob, priority: Priority) -> JobHandle:
        stored = self.stored_result(job)
        if stored is not None:
            return JobHandle(job, async_result=None, stored=stored)
        self._check_queued(job)
        # One task id per dataset and job: a resubmit of a failed job must not see the old failure.
        previous = self._app.AsyncResult(task_id(job.dataset, job.id))
        if previous.state == states.FAILURE:
            previous.forget()
        queued_at = datetime.now(UTC).isoformat()
        step = PRIORITY_STEPS[priority]
        publish(self._app, self._redis, [job], step, queued_at, keep_result=True, tenant=self.tenant)
        return JobHandle(
            job,
            async_result=self._app.AsyncResult(task_id(job.dataset, job.id)),
            stored=None,
            lookup=lambda: self.stored_result(job),
        )
