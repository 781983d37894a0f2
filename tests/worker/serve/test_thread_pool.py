"""The worker's thread pool ends a task whose outcome could not be recorded: its callback gets a requeueing
Reject when Redis was away, the error itself otherwise, where Celery's own thread pool leaves the request
pending for good (its prefetch slot with it)."""

from __future__ import annotations

import threading
from typing import Any

import redis
from celery.concurrency.thread import TaskPool as CeleryThreadPool
from celery.exceptions import Reject

from fluxfarm.worker.serve.thread_pool import TaskPool


def _outcome(pool_class: type[CeleryThreadPool], target: Any) -> tuple[Any, ...] | None:
    pool = pool_class(limit=1)
    pool.start()
    outcomes: list[tuple[Any, ...]] = []
    called = threading.Event()

    def callback(outcome: tuple[Any, ...]) -> None:
        outcomes.append(outcome)
        called.set()

    try:
        result = pool.apply_async(target, callback=callback)
        result.wait(10)
        called.wait(1)
    finally:
        pool.stop()
    return outcomes[0] if outcomes else None


def _backend_down(*_: Any) -> Any:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_trace_that_raises_ends_in_a_requeueing_reject() -> None:
    outcome = _outcome(TaskPool, _backend_down)
    assert outcome is not None, "the request's callback ran"
    failed, info, _runtime = outcome
    reject = info.exception.exc  # billiard's ExceptionWithTraceback, which Celery's Request unwraps
    assert failed == 1
    assert isinstance(reject, Reject) and reject.requeue
    assert "ConnectionError: Error 111" in reject.reason


def _redis_full(*_: Any) -> Any:
    raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")


def test_any_other_error_fails_the_task_so_that_no_job_comes_back_for_ever() -> None:
    outcome = _outcome(TaskPool, _redis_full)
    assert outcome is not None
    failed, info, _runtime = outcome
    assert failed == 1
    assert isinstance(info.exception.exc, redis.exceptions.OutOfMemoryError)


def test_celery_s_own_pool_drops_it_and_a_trace_that_returns_is_untouched() -> None:
    assert _outcome(CeleryThreadPool, _backend_down) is None, "the gap this pool closes"
    assert _outcome(TaskPool, lambda: (0, "ok", 0.5)) == (0, "ok", 0.5)
