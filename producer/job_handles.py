"""What a submit returns: a handle per job (`result()` from the backend or from storage) and a batch of
them that yields its jobs as they complete. Results are checked to be the job's own before they are
returned: a named id cannot hand one job another's image."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from celery import Celery, states
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


class JobHandle:
    """A submitted job: like a future, `result()` blocks until the worker has stored it."""

    def __init__(
        self,
        job: RenderJob,
        async_result: AsyncResult | None,
        stored: RenderResult | None,
        lookup: Callable[[], RenderResult | None] | None = None,
    ) -> None:
        self.job = job
        self._async = async_result
        self._stored = stored
        self._lookup = lookup
        """Reads the job's stored result: the truth when the result backend is away or restarting."""

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def task_id(self) -> str:
        return task_id(self.job.dataset, self.job.id)

    @property
    def cached(self) -> bool:
        """True when the result was already stored at submit time, so nothing was enqueued."""
        return self._async is None

    def done(self) -> bool:
        return self._stored is not None or (self._async is not None and self._async.ready())

    def result(self, timeout: float | None = None) -> RenderResult:
        """The job's metadata; raises `JobFailed` if the worker failed it, `TimeoutError` on timeout."""
        if self._stored is not None:
            return self._stored
        assert self._async is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = STORAGE_CHECK_S if deadline is None else max(0.0, min(STORAGE_CHECK_S, deadline - time.monotonic()))
            try:
                value = self._async.get(timeout=left, propagate=False)
                break
            except (CeleryTimeoutError, redis.RedisError, RuntimeError) as error:
                # RuntimeError: Celery's result consumer gives up after a Redis restart ("must be
                # restarted"). Storage is the truth: a stored job is done whatever the backend says.
                if self._lookup is not None and (stored := self._lookup()) is not None:
                    self._stored = stored
                    return stored
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.job_id} did not finish within {timeout}s") from None
                if not isinstance(error, CeleryTimeoutError):
                    time.sleep(1.0)
        if self._async.state != states.SUCCESS:
            failure = self._async.result
            reason = f"{type(failure).__name__}: {failure}" if isinstance(failure, BaseException) else str(failure)
            raise JobFailed(self.job_id, reason)
        self._stored = self._own_result(value)
        return self._stored

    def _own_result(self, value: Any) -> RenderResult:
        """The task's return value (the metadata less the job, and the job's dataset) as this job's result,
        once its dataset and job id are this job's."""
        if not isinstance(value, dict) or (value.get("dataset"), value.get("job_id")) != (
            self.job.dataset,
            self.job_id,
        ):
            raise JobConflict.naming(self.job.dataset, self.job_id, "a result from the backend")
        fields = {key: item for key, item in value.items() if key != "dataset"}
        return RenderResult.model_validate({**fields, "job": self.job.model_dump(mode="json")})


class JobBatch:
    """Handles of many jobs, iterable in submission order or as they complete."""

    def __init__(self, app: Celery, handles: list[JobHandle]) -> None:
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
        try:
            for task_id, _meta in self._app.backend.get_many(set(waiting), timeout=timeout, interval=_POLL_INTERVAL_S):
                yield from waiting.pop(task_id, [])
        except CeleryTimeoutError:
            raise TimeoutError(f"{len(waiting)} jobs did not finish within {timeout}s") from None
