"""A submit of a few jobs asks about those jobs, not about their whole dataset: a single-job POST to the
gateway cost a listing of every stored object and a read of every queued id of its dataset, which grows
with the dataset (100,000 images: seconds per POST). A stream (a file) still lists once per dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import LOOKUP_EACH_MAX, FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.local_store import LocalStore


class CountedStore(LocalStore):
    """The local store, counting its listings."""

    listings = 0

    def _list(self, folder: str) -> Iterator[str]:
        CountedStore.listings += 1
        return super()._list(folder)


@pytest.fixture
def client(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> Iterator[FarmClient]:
    redis_client.flushdb()
    with FarmClient(ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path}")) as farm:
        farm.store = CountedStore(tmp_path)
        yield farm


def test_a_few_jobs_are_looked_up_one_by_one_and_still_found_stored_or_waiting(client: FarmClient) -> None:
    jobs = [{"prompt": f"a wren {i}", "dataset": "wrens", "width": 256, "height": 256} for i in range(3)]
    stored = parse_job(jobs[0])
    keys = client.store.result_keys("wrens", stored.id)
    client.store.put(keys.metadata, b"{}", "application/json")  # stored: its metadata JSON exists
    assert client.submit_stream([jobs[1]]).enqueued == 1  # now queued
    CountedStore.listings = 0
    outcomes: dict[str, str] = {}
    counts = client.submit_stream(jobs, on_outcome=lambda job, outcome: outcomes.setdefault(job.prompt, outcome))
    assert CountedStore.listings == 0, "no listing of the dataset"
    assert (counts.already_stored, counts.already_waiting, counts.enqueued) == (1, 1, 1)
    assert outcomes == {"a wren 0": "stored", "a wren 1": "waiting", "a wren 2": "enqueued"}


def test_a_stream_lists_its_dataset_once(client: FarmClient) -> None:
    many = ({"prompt": f"a finch {i}", "dataset": "finches", "width": 256} for i in range(LOOKUP_EACH_MAX + 1))
    CountedStore.listings = 0
    assert client.submit_stream(many).enqueued == LOOKUP_EACH_MAX + 1
    assert CountedStore.listings == 1
