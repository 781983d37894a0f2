"""A dataset stream reads the finished jobs in pages (FINISHED_PAGE at a time): a stream that joins a large
finished dataset late gets every job once, without one unbounded read (real Redis, the real record scripts),
and remembers only the ids a later read can return again."""

from __future__ import annotations

import bisect
import tracemalloc
from pathlib import Path

import pytest
import redis

from fluxfarm.producer import dataset_stream
from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.datasets import DatasetRecord


def test_a_finished_dataset_streams_in_pages_every_job_once(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_client.flushdb()
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}")
    monkeypatch.setattr(dataset_stream, "FINISHED_PAGE", 3)
    with FarmClient(settings) as client:
        for index in range(8):
            client.datasets.mark_done("pages", f"job-{index}", "bf16")
        asked: list[tuple[float, int | None]] = []
        finished_since = client.finished_since

        def paged(dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]:
            asked.append((since, limit))
            return finished_since(dataset, since, limit)

        monkeypatch.setattr(client, "finished_since", paged)
        outcomes = list(dataset_stream.stream_outcomes(client, "pages", 10.0, False, None))
    assert sorted(outcome.job_id for outcome in outcomes) == [f"job-{index}" for index in range(8)]
    assert all(limit == 3 for _, limit in asked) and len(asked) >= 3  # 8 jobs, 3 a page
    assert [since for since, _ in asked] == sorted(since for since, _ in asked)


class _FinishedList:
    """A DatasetReader over `count` finished jobs, 10 s apart (well beyond the stream's re-read window), whose
    ids are new strings on every read, as a Redis reply's are: the stream's own memory is what is measured."""

    def __init__(self, count: int) -> None:
        self.times = [10.0 * index for index in range(count)]

    def dataset_record(self, dataset: str) -> DatasetRecord:
        return DatasetRecord(
            name=dataset, created_at=None, updated_at=None, queued=0, running=0, done=len(self.times), failed=0,
            defaults={}, levels=[], failures={},
        )  # fmt: skip

    def finished_since(self, dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]:
        start = bisect.bisect_left(self.times, since)
        end = len(self.times) if limit is None else min(len(self.times), start + limit)
        return [(f"job-{index:064d}", self.times[index]) for index in range(start, end)]

    def dataset_result(self, dataset: str, job_id: str) -> None:
        return None


def test_a_stream_remembers_only_the_ids_it_can_read_again() -> None:
    """A million-job dataset must not cost a million remembered ids: 120,000 jobs (pages of 10,000) stream in
    well under the ~20 MiB their ids take when every one is kept (the page read, ~3.5 MiB, is the floor)."""
    reader = _FinishedList(120_000)
    tracemalloc.start()
    try:
        count = sum(1 for _ in dataset_stream.stream_outcomes(reader, "big", 10.0, False, None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 120_000
    assert peak < 6 * 2**20, f"the stream held {peak / 2**20:.1f} MiB"
