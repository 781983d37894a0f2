"""The Celery app both sides build: JSON only, late acks, one job at a time per worker, priorities.

The producer sends by task name and never imports the worker, so the client stays free of torch.

Priorities on the Redis transport: kombu keeps one Redis list per queue and priority step and a
worker's BRPOP asks for every queue's step 0 before any queue's step 3, so a high-priority job
overtakes every normal and low one still waiting, whichever level queue it is in.
"""

from __future__ import annotations

from typing import Literal

import redis
from celery import Celery

from shared.routing import QuantConstraint
from shared.settings import FarmSettings

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


def waiting_messages(client: redis.Redis, queues: list[str]) -> list[int]:
    """How many messages wait in each of `queues`, all priorities together (one round trip)."""
    with client.pipeline() as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return [sum(lengths[i * steps : (i + 1) * steps]) for i in range(len(queues))]


def make_celery_app(settings: FarmSettings, name: str = "fluxfarm") -> Celery:
    """A configured Celery app; nothing global, so tests and processes can hold several."""
    app = Celery(name, broker=settings.broker_url, backend=settings.result_backend)
    # An unacked job comes back after this long; it must outlast the longest render (celery#5935),
    # and Celery reads it in three places.
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    priorities = {"priority_steps": sorted(PRIORITY_STEPS.values()), "sep": _PRIORITY_LIST_SEP}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={**visibility, **priorities},
        result_backend_transport_options=visibility,
        visibility_timeout=settings.visibility_timeout_s,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        task_default_queue=QUEUE_ANY,
        task_default_priority=PRIORITY_STEPS["normal"],
        result_expires=settings.result_expires_s,
        result_extended=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
