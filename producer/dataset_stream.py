"""A dataset's jobs as they finish, for any producer that can read the dataset's record: the Redis
client and the gateway's HTTP client share this one loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from pydantic import BaseModel

from fluxfarm.shared.datasets import DatasetRecord
from fluxfarm.shared.metadata import RenderResult

POLL_S = 0.5
CLOCK_SLACK_S = 2.0
"""A dataset stream re-reads this far behind its last finishing time (ids already seen are skipped)."""
FINISHED_PAGE = 10_000
"""Finished jobs read at once: a stream that joins a million-job dataset late reads it in pages, and each page
starts at the last one's finishing time (Redis stamps each job in its own script call, to the microsecond, so
no page's worth of jobs shares one time)."""


class DatasetOutcome(BaseModel):
    """One finished job of a dataset stream: its stored result, or the worker's reason for failing it."""

    job_id: str
    result: RenderResult | None = None
    """None for a failure, and for successes when the stream was asked not to load results."""
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


class DatasetReader(Protocol):
    def dataset_record(self, dataset: str) -> DatasetRecord: ...

    def finished_since(self, dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]: ...

    def dataset_result(self, dataset: str, job_id: str) -> RenderResult | None: ...


def stream_outcomes(
    reader: DatasetReader,
    dataset: str,
    timeout: float | None,
    with_results: bool,
    on_poll: Callable[[DatasetRecord], None] | None,
) -> Iterator[DatasetOutcome]:
    """Each of `dataset`'s jobs as it finishes, until none is queued or running; TimeoutError past `timeout`.

    Memory stays bounded by the re-read window, not the dataset: a finished id is remembered only while its
    finishing time is inside the window the next read starts at (a million-job dataset would otherwise keep a
    million ids); failures are remembered as the dataset record holds them, which is already in memory."""
    deadline = None if timeout is None else time.monotonic() + timeout
    recent: dict[str, float] = {}
    """Finished ids a later read can return again (finishing time ≥ `since`), with their finishing times."""
    failed: set[str] = set()
    since = 0.0
    while True:
        record = reader.dataset_record(dataset)  # before the finished list, so a final empty poll misses nothing
        if on_poll is not None:
            on_poll(record)
        page_since = since
        while True:
            page = reader.finished_since(dataset, page_since, FINISHED_PAGE)
            for job_id, finished_at in page:
                since = max(since, finished_at - CLOCK_SLACK_S)
                if job_id not in recent:
                    recent[job_id] = finished_at
                    result = reader.dataset_result(dataset, job_id) if with_results else None
                    yield DatasetOutcome(job_id=job_id, result=result)
            recent = {job_id: at for job_id, at in recent.items() if at >= since}
            if len(page) < FINISHED_PAGE or page[-1][1] <= page_since:
                break
            page_since = page[-1][1]
        for job_id, reason in sorted(record.failures.items()):
            if job_id not in failed and job_id not in recent:
                failed.add(job_id)
                yield DatasetOutcome(job_id=job_id, failure=reason)
        if record.queued == 0 and record.running == 0:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"dataset {dataset}: {record.queued + record.running} jobs still waiting after {timeout}s"
            )
        time.sleep(POLL_S)
