"""The lost-job sweep on a real Redis with real kombu messages: it reads the queues in chunks and keeps
only ids, finds the one job whose message is gone, and gives up for its round past its byte bound
(issue 18, finding 2: it read every queue whole, `LRANGE 0 -1`, bounded by count not bytes)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import parse_job
from fluxfarm.worker.serve import lost_jobs
from fluxfarm.worker.serve.lost_jobs import SCAN_CHUNK, LostJobSweeper

WAITING = 2 * SCAN_CHUNK + 7


@pytest.fixture
def farm(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> FarmClient:
    redis_client.flushdb()
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path}/out")
    client = FarmClient(settings)
    client.submit_stream({"prompt": f"row {i}", "dataset": "big", "steps": 2} for i in range(WAITING))
    lost = parse_job({"prompt": "its message was lost", "dataset": "big"})
    client.datasets.note_queued("big", [SentJob.of(lost, 3, datetime.now(UTC).isoformat(), keep_result=False)])
    return client


def _sweeper(farm: FarmClient, redis_client: redis.Redis, resent: list[str]) -> LostJobSweeper:
    return LostJobSweeper(redis_client, farm.datasets, lambda sent: resent.append(sent.job["prompt"]), 0, 1)


def test_the_sweep_reads_every_chunk_and_resends_only_the_lost_job(farm: FarmClient, redis_client: redis.Redis) -> None:
    resent: list[str] = []
    sweeper = _sweeper(farm, redis_client, resent)
    assert len(sweeper.message_ids() or ()) == WAITING
    sweeper.sweep_once()
    assert resent == ["its message was lost"]


def test_a_sweep_past_its_byte_bound_gives_up_its_round(
    farm: FarmClient, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lost_jobs, "MAX_SCANNED_BYTES", 100 * 1024)
    resent: list[str] = []
    sweeper = _sweeper(farm, redis_client, resent)
    assert sweeper.message_ids() is None
    assert sweeper.sweep_once() == [] and resent == [], "nothing is resent on a partial view of the queues"


def test_each_sweep_retires_finished_datasets_past_the_retention(farm: FarmClient, redis_client: redis.Redis) -> None:
    done = parse_job({"prompt": "long finished", "dataset": "history"})
    farm.datasets.note_queued("history", [SentJob.of(done, 3, datetime.now(UTC).isoformat(), keep_result=False)])
    farm.datasets.mark_done("history", done.id, "Q8_0")
    redis_client.hset("fluxfarm:dataset:history:meta", "updated_at", "2020-01-01T00:00:00+00:00")
    sweeper = LostJobSweeper(redis_client, farm.datasets, lambda sent: None, 60, 1, retention_s=7 * 24 * 3600)
    sweeper.sweep_once()
    assert farm.datasets.names() == ["big"], "the dataset still waiting stays; the finished one leaves"
