"""Finished datasets leave the active index after the retention, so status, the exporter and the sweep
cost grows with active datasets, not with history (issue 18, finding 9: at 20,000 datasets one status
read took 7.5 s, and the exporter paid it every scrape). On a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis

from fluxfarm.shared import keys
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import parse_job

DAY_S = 24 * 3600


def _queue(book: DatasetBook, dataset: str, prompt: str) -> str:
    job = parse_job({"prompt": prompt, "dataset": dataset})
    book.note_queued(dataset, [SentJob.of(job, 3, datetime.now(UTC).isoformat(), keep_result=False)])
    return job.id


def _age(client: redis.Redis, dataset: str, days: float) -> None:
    then = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    client.hset(f"fluxfarm:dataset:{dataset}:meta", "updated_at", then)


def test_only_finished_datasets_untouched_past_the_retention_leave_the_index(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    book = DatasetBook(redis_client)
    for name in ("old-done", "new-done", "old-waiting"):
        job_id = _queue(book, name, f"a job of {name}")
        if name.endswith("done"):
            book.mark_done(name, job_id, "Q8_0")
    _age(redis_client, "old-done", 30)
    _age(redis_client, "old-waiting", 30)  # still has a queued job: active, however old
    assert book.retire_finished(7 * DAY_S) == ["old-done"]
    assert book.names() == ["new-done", "old-waiting"]
    assert book.record("old-done").done == 1, "the record stays, read by name"
    assert redis_client.smembers(keys.DATASETS_RETIRED) == {b"old-done"}
    assert book.retire_finished(7 * DAY_S) == []


def test_a_submit_to_a_retired_dataset_makes_it_active_again(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    book = DatasetBook(redis_client)
    book.mark_done("again", _queue(book, "again", "first"), "Q8_0")
    _age(redis_client, "again", 30)
    assert book.retire_finished(7 * DAY_S) == ["again"] and book.names() == []
    _queue(book, "again", "second")
    assert book.names() == ["again"] and not redis_client.smembers(keys.DATASETS_RETIRED)
