"""The Celery app both sides build: JSON only, late acks, one job at a time per worker.

The producer sends by task name and never imports the worker, so the client stays free of torch.
"""

from __future__ import annotations

from celery import Celery

from shared.routing import QuantConstraint
from shared.settings import FarmSettings

RENDER_TASK = "fluxfarm.render"
"""The task name the producer sends and the worker registers."""

QUEUE_ANY = QuantConstraint("auto").queue
"""Jobs any worker may take; `shared.routing` names the per-level queues."""


def make_celery_app(settings: FarmSettings, name: str = "fluxfarm") -> Celery:
    """A configured Celery app; nothing global, so tests and processes can hold several."""
    app = Celery(name, broker=settings.broker_url, backend=settings.result_backend)
    # An unacked job comes back after this long; it must outlast the longest render (celery#5935),
    # and Celery reads it in three places.
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
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
        broker_transport_options=visibility,
        result_backend_transport_options=visibility,
        visibility_timeout=settings.visibility_timeout_s,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        task_default_queue=QUEUE_ANY,
        result_expires=settings.result_expires_s,
        result_extended=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
