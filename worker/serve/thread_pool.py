"""Celery's thread pool with one gap closed: a task whose outcome cannot be recorded still ends.

Celery's `apply_target` re-raises whatever a task's trace raises instead of calling the request's
callback, and the thread pool leaves that exception in a future nobody reads: the request is never
acknowledged, rejected or marked ready, and its prefetch slot stays taken. A trace raises when the result
backend cannot be written: Redis restarting as a render ends fails the SUCCESS write, then the write of
that failure. Here such a request ends anyway:
- Redis unreachable (a restart, a network cut): rejected with requeue, so its message goes back to the
  queue (or, with Redis still away, stays unacknowledged and returns after its lease); the redelivery
  finds the image stored and records it;
- anything else (a full Redis refusing the write, a bug): failed, as Celery fails a task whose body
  raised, so its message is acknowledged and no job can come back for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.concurrency import thread
from celery.exceptions import Reject

from fluxfarm.worker.serve.redis_writes import REDIS_AWAY

log = logging.getLogger(__name__)

POOL = f"{__name__}:TaskPool"
"""Celery's `worker_pool` setting for this pool."""


def ended_if_unrecorded(target: Callable[..., Any]) -> Callable[..., Any]:
    """`target` (Celery's trace of one task), returning a failed outcome for its callback where it would raise."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return target(*args, **kwargs)
        except Exception as error:
            why = f"{type(error).__name__}: {error}"
            if not isinstance(error, REDIS_AWAY):
                log.error("a task's outcome could not be recorded (%s); the task fails", why)
                return 1, ExceptionInfo(), 0.0  # Celery's (failed, exception info, runtime) for the callback
            log.warning("a task's outcome could not be recorded (%s); its message goes back to the queue", why)
            try:
                raise Reject(f"outcome not recorded: {why}", requeue=True) from error
            except Reject:
                return 1, ExceptionInfo(), 0.0

    return run


class TaskPool(thread.TaskPool):
    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **options: Any,
    ) -> thread.ApplyResult:
        return super().on_apply(ended_if_unrecorded(target), args, kwargs, callback, accept_callback, **options)
