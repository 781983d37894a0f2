"""A dataset stream reads the finished jobs in pages (FINISHED_PAGE at a time): a stream that joins a large
finished dataset late gets every job once, without one unbounded read. Real Redis, the real record scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from fluxfarm.producer import dataset_stream
from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings


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
