"""Publishing render jobs: the one way a job enters the farm, whoever sends it (the client, the bulk
submitter, the worker's lost-job sweep and, later, the gateway).

The order is the protocol. First a LoRA set's or tenant's queue is registered (shared/queue_registry.py),
so workers consume it. Then the dataset record notes the jobs, so a crash before the messages leaves recorded jobs
without one, which the lost-job sweep sends again, never a message the record does not know. Then the
messages go out in one pipelined round trip. A Redis that refuses the messages (over its maxmemory) gets
the record of the unsent ones taken back, so the record and the queues agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import BatchPublishError, OperationalError

from fluxfarm.shared.celery_app import message_task_id, queue_lists, send_render, task_id
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.queue_registry import note_queues
from fluxfarm.shared.routing import tenant_queue

SENT_MARGIN = 1000
"""Messages other producers may have pushed onto a queue's head since ours, read past when looking for
which of ours arrived."""


class PublishRefused(FarmError):
    """Redis refused the jobs (over its maxmemory); the dataset record holds only those that were sent."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"Redis refused the jobs (over its maxmemory: {cause.__class__.__name__})")
        self.cause = cause


def publish(
    app: Celery,
    client: redis.Redis,
    jobs: Sequence[RenderJob],
    priority: int,
    queued_at: str,
    keep_result: bool,
    *,
    tenant: str | None = None,
    record: bool = True,
    producer: Any = None,
) -> None:
    """Send `jobs` at `priority` (a kombu step, shared.celery_app.PRIORITY_STEPS) to their queues, or to
    their queues' `tenant` queues (shared/routing.py), noting them in their datasets' records first unless
    `record` is False (the lost-job sweep resends what the record holds, attempts and tenant included).
    `producer` is a kombu producer a caller keeps across many calls."""
    sends = [(job, tenant_queue(job.queue, tenant)) for job in jobs]
    queues = {queue for _, queue in sends}
    book = DatasetBook(client)
    try:
        note_queues(client, queues)
        if record:
            by_dataset: dict[str, list[SentJob]] = {}
            for job in jobs:
                by_dataset.setdefault(job.dataset, []).append(SentJob.of(job, priority, queued_at, keep_result, tenant))
            for dataset, sent_jobs in by_dataset.items():
                book.note_queued(dataset, sent_jobs)
        with app.producer_or_acquire(producer) as kombu_producer:
            for queue in queues:
                # Once here (cached per channel), instead of once per message inside send_task, which cost a
                # fifth of a stream's time in kombu's entity copies.
                kombu_producer.maybe_declare(app.amqp.queues[queue])
            with kombu_producer.batch(max_size=2 * len(jobs)):
                for job, queue in sends:
                    send_render(app, job, queue, priority, queued_at, keep_result, producer=kombu_producer)
    except (redis.exceptions.OutOfMemoryError, BatchPublishError, OperationalError) as error:
        if record:
            _take_back_unsent(client, book, jobs, queues)
        raise PublishRefused(error) from error


def _take_back_unsent(client: redis.Redis, book: DatasetBook, jobs: Sequence[RenderJob], queues: set[str]) -> None:
    """After a refused batch: the jobs whose messages did not reach their queue leave the record (a
    non-transactional pipeline may have sent some). New messages go to the head of their lists."""
    present: set[str] = set()
    for queue in queues:
        for name in queue_lists(queue):
            raws = client.lrange(name, 0, len(jobs) + SENT_MARGIN)
            present |= {found for raw in raws if (found := message_task_id(raw)) is not None}
    unsent: dict[str, list[str]] = {}
    for job in jobs:
        if task_id(job.dataset, job.id) not in present:
            unsent.setdefault(job.dataset, []).append(job.id)
    for dataset, ids in unsent.items():
        book.forget_queued(dataset, ids)
