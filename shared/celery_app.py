"""The Celery app both sides build: JSON only, late acks, one job at a time per worker, priorities.

The producer sends by task name and never imports the worker, so the client stays free of torch.

Priorities on the Redis transport: kombu keeps one Redis list per queue and priority step and a
worker's BRPOP asks for every queue's step 0 before any queue's step 3, so a high-priority job
overtakes every normal and low one still waiting, whichever level queue it is in.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import redis
from celery import Celery

from fluxfarm.shared.jobs import RenderJob, job_payload
from fluxfarm.shared.redis_conn import tls_options
from fluxfarm.shared.redis_transport import TRANSPORT
from fluxfarm.shared.routing import QuantConstraint
from fluxfarm.shared.settings import FarmSettings

RENDER_TASK = "fluxfarm.render"
"""The task name the producer sends and the worker registers."""

QUEUE_ANY = QuantConstraint("auto").queue
"""Jobs any worker may take; `shared.routing` names the per-level queues."""


Priority = Literal["high", "normal", "low"]
PRIORITY_STEPS = {"high": 0, "normal": 3, "low": 6}
"""Message priority of each choice. kombu's Redis transport serves step 0 first."""
_PRIORITY_LIST_SEP = ":"
"""kombu names the Redis list of queue Q at step N `Q:N` (step 0 is `Q` itself)."""


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s waiting messages, one per priority step."""
    return [queue if step == 0 else f"{queue}{_PRIORITY_LIST_SEP}{step}" for step in PRIORITY_STEPS.values()]


def waiting_by_priority(client: redis.Redis, queues: list[str]) -> list[tuple[int, ...]]:
    """How many messages wait in each of `queues` at each priority step, highest first (one round trip; not
    a transaction, which a Redis over maxmemory refuses even for reads)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return [tuple(lengths[i * steps : (i + 1) * steps]) for i in range(len(queues))]


def waiting_messages(client: redis.Redis, queues: list[str]) -> list[int]:
    """How many messages wait in each of `queues`, all priorities together (one round trip)."""
    return [sum(counts) for counts in waiting_by_priority(client, queues)]


def queue_footprint(client: redis.Redis, queues: list[str]) -> int:
    """The bytes `queues`' waiting messages take in Redis, all priorities (MEMORY USAGE, which samples a long
    list's nodes rather than walking it)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.memory_usage(name)
        return sum(size or 0 for size in pipe.execute())


def most_urgent(counts: tuple[int, ...]) -> int | None:
    """The index of the highest priority step at which anything waits (0 is `high`); None when empty."""
    return next((step for step, count in enumerate(counts) if count), None)


def message_task_id(raw: bytes | str) -> str | None:
    """The task id in a kombu message as stored in a queue list, or in `unacked` ([message, exchange, key])."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list) and message:
        message = message[0]
    headers = message.get("headers") if isinstance(message, dict) else None
    found = headers.get("id") if isinstance(headers, dict) else None
    return found if isinstance(found, str) else None


def task_id(dataset: str, job_id: str) -> str:
    """A job's Celery task id: its dataset and id, so jobs of two datasets that share an id (a content id
    is the same wherever the job is sent) never share a result in the backend. Both parts are safe
    names, which never hold a ':'."""
    return f"{dataset}:{job_id}"


def send_render(
    app: Celery, job: RenderJob, queue: str, priority: int, queued_at: str, keep_result: bool, producer: Any = None
) -> None:
    """One render job's message to `queue`, for shared/publish.py (the one way a job is sent, which picks
    the queue, notes it and the job's record first). The task id is `task_id(dataset, job id)`; `producer`
    batches many sends into one round trip (queues declared by the caller)."""
    batching = {"producer": producer, "declare": []} if producer is not None else {}
    app.send_task(
        RENDER_TASK,
        kwargs={"job": job_payload(job), "queued_at": queued_at},
        task_id=task_id(job.dataset, job.id),
        queue=queue,
        priority=priority,
        ignore_result=not keep_result,
        # Celery's own repr of the payload (for its logs; in the headers and again in the properties) costs
        # more than sending it, and the task id names the job already.
        argsrepr="()",
        kwargsrepr="{}",
        **batching,
    )


def lease_renew_interval_s(lease_s: float) -> float:
    """How often a worker renews its leases: six chances before one lapses."""
    return lease_s / 6


def _transport_options(settings: FarmSettings) -> dict[str, object]:
    """kombu's Redis ack emulation as a lease: an unacked message whose `unacked_index` score is older
    than `visibility_timeout` goes back to its queue at the next sweep. Workers renew the score of the
    messages they hold (worker/serve/leases.py), so the timeout is the lease, not the longest render, and
    every live worker sweeps often enough to put a dead one's jobs back within lease + one sweep."""
    sweep_s = max(1, round(lease_renew_interval_s(settings.lease_s)))
    return {
        "visibility_timeout": settings.lease_s,
        "unacked_restore_interval": sweep_s,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": settings.lease_s,  # a sweeper killed holding the mutex blocks sweeps this long
        "priority_steps": sorted(PRIORITY_STEPS.values()),
        "sep": _PRIORITY_LIST_SEP,
    }


def make_celery_app(settings: FarmSettings, name: str = "fluxfarm") -> Celery:
    """A configured Celery app; nothing global, so tests and processes can hold several."""
    app = Celery(name, broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport=TRANSPORT,
        broker_transport_options=_transport_options(settings),
        broker_use_ssl=tls_options(settings.broker_url, settings.tls_ca_file),
        redis_backend_use_ssl=tls_options(settings.result_backend, settings.tls_ca_file),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis restart may take a while: keep trying
        task_track_started=True,
        task_default_queue=QUEUE_ANY,
        task_default_priority=PRIORITY_STEPS["normal"],
        result_expires=settings.result_expires_s,
        # The task's return value only: extended results kept the job's whole payload (its prompt, an
        # inline image) in every celery-task-meta key again.
        result_extended=False,
        worker_hijack_root_logger=False,
        # Off unless asked for: the control channel lets anyone on the broker stop a worker consuming.
        worker_enable_remote_control=settings.remote_control,
        enable_utc=True,
    )
    return app
