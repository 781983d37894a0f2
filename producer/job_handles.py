"""What a submit returns: a handle per job (`result()` from the backend or from storage) and a batch of
them that yields its jobs as they complete. Results are checked to be the job's own before they are
returned: a named id cannot hand one job another's image."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import redis
from celery import Celery, states
from celery.exceptions import BackendError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from fluxfarm.shared.celery_app import task_id
from fluxfarm.shared.errors import JobConflict, JobFailed
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.metadata import RenderResult

_POLL_INTERVAL_S = 0.25
STORAGE_CHECK_S = 10.0
"""A waiting `result()` also looks in storage this often, so a result the backend lost still arrives."""


def owned_result(job: RenderJob, result: RenderResult) -> RenderResult:
    """`result` if it is `job`'s own; a result under the same id for another job is a conflict."""
    if result.job_id != job.id or result.job != job:
        raise JobConflict.naming(job.dataset, job.id, "stored")
    return result


class ResultWaiter(Protocol):
    """How a handle learns its job's outcome: from Celery's result backend (CeleryWaiter) or from the
    gateway (producer/http_client.py). Either raises JobFailed for a failure, TimeoutError past `timeout`."""

    def ready(self) -> bool: ...

    def wait(self, timeout: float | None) -> RenderResult: ...


class CeleryWaiter:
    """The outcome from Celery's result backend, with storage as the truth when the backend is away."""

    def __init__(self, job: RenderJob, async_result: AsyncResult, lookup: Callable[[], RenderResult | None] | None):
        self.job = job
        self.async_result = async_result
        self._lookup = lookup
        """Reads the job's stored result: the truth when the result backend is away or restarting."""

    def ready(self) -> bool:
        return bool(self.async_result.ready())

    def wait(self, timeout: float | None) -> RenderResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = STORAGE_CHECK_S if deadline is None else max(0.0, min(STORAGE_CHECK_S, deadline - time.monotonic()))
            try:
                value = self.async_result.get(timeout=left, propagate=False)
                if self.async_result.state == states.FAILURE and not self._failure_is_held():
                    self.async_result = AsyncResult(self.async_result.id, app=self.async_result.app)
                    continue
                break
            except (CeleryTimeoutError, redis.RedisError, RuntimeError) as error:
                # RuntimeError: Celery's result consumer gives up after a Redis restart ("must be
                # restarted"). Storage is the truth: a stored job is done whatever the backend says.
                if self._lookup is not None and (stored := self._lookup()) is not None:
                    return stored
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.job.id} did not finish within {timeout}s") from None
                if not isinstance(error, CeleryTimeoutError):
                    time.sleep(1.0)
        if self.async_result.state != states.SUCCESS:
            # A job stored after all (its worker could write the failure of a later step, not the success: a
            # full or restarting Redis) is done: storage is the truth, and one read costs only a failure.
            if self._lookup is not None and (stored := self._lookup()) is not None:
                return stored
            failure = self.async_result.result
            reason = f"{type(failure).__name__}: {failure}" if isinstance(failure, BaseException) else str(failure)
            raise JobFailed(self.job.id, reason)
        return self._own_result(value)

    def _failure_is_held(self) -> bool:
        """Whether the result backend itself holds the failure Celery's result consumer reported. A resubmit
        forgets its task id's earlier failure before sending, but that failure's pub/sub message can still
        sit unread in the consumer's connection (or its buffer, celery#8166) and reach this waiter, which
        shares the task id: it is an earlier submission's outcome, not this one's, when the key is gone."""
        try:
            held = self.async_result.backend.get_task_meta(self.async_result.id, cache=False)
        except (redis.RedisError, BackendError):
            return True  # the backend cannot be asked: believe what it sent
        return bool(held.get("status") == states.FAILURE)

    def _own_result(self, value: Any) -> RenderResult:
        """The task's return value (the metadata less the job, and the job's dataset) as this job's result,
        once its dataset and job id are this job's."""
        if not isinstance(value, dict) or (value.get("dataset"), value.get("job_id")) != (
            self.job.dataset,
            self.job.id,
        ):
            raise JobConflict.naming(self.job.dataset, self.job.id, "a result from the backend")
        fields = {key: item for key, item in value.items() if key != "dataset"}
        return RenderResult.model_validate({**fields, "job": self.job.model_dump(mode="json")})


class JobHandle:
    """A submitted job: like a future, `result()` blocks until the worker has stored it."""

    def __init__(
        self,
        job: RenderJob,
        async_result: AsyncResult | None = None,
        stored: RenderResult | None = None,
        lookup: Callable[[], RenderResult | None] | None = None,
        waiter: ResultWaiter | None = None,
    ) -> None:
        """A handle waits on `waiter`, or on Celery's `async_result`; with neither, the job was stored."""
        self.job = job
        self._stored = stored
        self._waiter = waiter or (CeleryWaiter(job, async_result, lookup) if async_result is not None else None)

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def task_id(self) -> str:
        return task_id(self.job.dataset, self.job.id)

    @property
    def cached(self) -> bool:
        """True when the result was already stored at submit time, so nothing was enqueued."""
        return self._waiter is None

    def done(self) -> bool:
        return self._stored is not None or (self._waiter is not None and self._waiter.ready())

    def result(self, timeout: float | None = None) -> RenderResult:
        """The job's metadata; raises `JobFailed` if the worker failed it, `TimeoutError` on timeout."""
        if self._stored is None:
            assert self._waiter is not None
            self._stored = self._waiter.wait(timeout)
        return self._stored


class JobBatch:
    """Handles of many jobs, iterable in submission order or as they complete."""

    def __init__(self, app: Celery | None, handles: list[JobHandle]) -> None:
        """`app`: the Celery app whose backend reports all the handles' tasks at once; None for handles
        that learn their outcomes otherwise (the gateway's), which are asked in turn."""
        self._app = app
        self.handles = handles

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[JobHandle]:
        return iter(self.handles)

    def as_completed(self, timeout: float | None = None) -> Iterator[JobHandle]:
        """Yield each handle once its job has finished (succeeded or failed), first done first."""
        waiting: dict[str, list[JobHandle]] = {}
        for handle in self.handles:
            if handle.cached:
                yield handle
            else:
                waiting.setdefault(handle.task_id, []).append(handle)
        if not waiting:
            return
        if self._app is None:
            yield from _polled(waiting, timeout)
            return
        try:
            for task_id, _meta in self._app.backend.get_many(set(waiting), timeout=timeout, interval=_POLL_INTERVAL_S):
                yield from waiting.pop(task_id, [])
        except CeleryTimeoutError:
            raise TimeoutError(f"{len(waiting)} jobs did not finish within {timeout}s") from None


def _polled(waiting: dict[str, list[JobHandle]], timeout: float | None) -> Iterator[JobHandle]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while waiting:
        for task, handles in list(waiting.items()):
            if handles[0].done():
                yield from waiting.pop(task)
        if waiting:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} jobs did not finish within {timeout}s")
            time.sleep(_POLL_INTERVAL_S)
