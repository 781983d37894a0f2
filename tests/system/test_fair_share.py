"""Fair share: one tenant's big dataset does not hold back another tenant's few jobs (issue 19, point 3).

A tenant's jobs wait in queues of their own (shared/routing.py), every worker consumes every tenant queue
its level serves (worker/serve/queue_adoption.py), and kombu's Redis transport takes from a worker's
queues in rotation within each priority step: the tenants' jobs reach the worker interleaved.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import waiting_messages
from fluxfarm.shared.fleet import read_workers
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.queue_registry import forget_idle_queues, registered_queues
from fluxfarm.shared.routing import constraint_of_queue, serves, tenant_queue
from tests.conftest import S3Server, fresh_farm_settings, start_worker
from tests.host_settings import HostSettings

pytestmark = pytest.mark.slow

DONE_TIMEOUT_S = 300


def _jobs(dataset: str, count: int) -> list[dict]:
    return [
        {"prompt": f"{dataset} {i}", "dataset": dataset, "width": 256, "height": 256, "steps": 1} for i in range(count)
    ]


def _finish_order(client: FarmClient, datasets: list[str], total: int) -> list[str]:
    """The datasets of the finished jobs in the order they finished, once `total` have."""
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while True:
        finished = [(at, name) for name in datasets for _, at in client.finished_since(name, 0)]
        if len(finished) >= total:
            return [name for _, name in sorted(finished)]
        assert time.monotonic() < deadline, f"{len(finished)} of {total} jobs finished"
        time.sleep(0.2)


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisServer, s3_server: S3Server) -> HostSettings:
    return fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/fair", tmp_path)


def _worker(settings: HostSettings, tiny_model: Path, work: Path) -> WorkerProcess:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    transformer = gguf_path(tiny_model, QuantLevel.Q8_0)
    return start_worker(settings, tiny_model, transformer, work / "worker.log", "w-fair", {"FLUXFARM_MAX_BATCH": "2"})


def test_a_tenants_few_jobs_are_rendered_between_anothers_many(
    settings: HostSettings, tiny_model: Path, tmp_path: Path
) -> None:
    """Alice queues 40 jobs, then Bob 4, before a worker starts: without tenant queues Bob's would be the
    last 4 rendered; with them they take turns with Alice's from the first."""
    with FarmClient(settings) as client:
        client.for_tenant("alice").submit_stream(_jobs("alice-set", 40))
        client.for_tenant("bob").submit_stream(_jobs("bob-set", 4))
        assert set(registered_queues(client.redis)) == {"render.any.t.alice", "render.any.t.bob"}
        assert waiting_messages(client.redis, ["render.any.t.alice", "render.any.t.bob", "render.any"]) == [40, 4, 0]
        worker = _worker(settings, tiny_model, tmp_path)
        try:
            order = _finish_order(client, ["alice-set", "bob-set"], 44)
        finally:
            worker.stop()
    bobs_last = max(i for i, name in enumerate(order) if name == "bob-set")
    # Taking turns, Bob's 4th job is at most the 8th delivered; the worker holds max_batch + 1 = 3 jobs at
    # once and finishes a batch in any order, which moves it back by at most that many.
    assert bobs_last < 2 * 4 + 3, order


def test_a_running_worker_takes_up_a_new_tenants_queue(
    settings: HostSettings, tiny_model: Path, tmp_path: Path
) -> None:
    """A tenant that sends its first jobs while the fleet is busy gets its queue consumed within a tick."""
    worker = _worker(settings, tiny_model, tmp_path)
    try:
        with FarmClient(settings) as client:
            client.for_tenant("alice").submit_stream(_jobs("alice-set", 90))
            client.for_tenant("bob").submit_stream(_jobs("bob-set", 3))
            order = _finish_order(client, ["alice-set", "bob-set"], 93)
            (status,) = read_workers(client.redis)
    finally:
        worker.stop()
    assert {"render.any.t.alice", "render.any.t.bob"} <= set(status.queues)
    bobs_last = max(i for i, name in enumerate(order) if name == "bob-set")
    # Bob's queue is consumed from the worker's next tick (2 s, some 12 jobs here), then takes turns.
    assert bobs_last < 60, f"Bob's last job was the {bobs_last + 1}th of 93 rendered"


def test_tenant_queues_route_like_their_constraint_and_leave_the_registry_when_idle(redis_client: redis.Redis) -> None:
    queue = tenant_queue("render.min.q6_k", "alice")
    assert queue == "render.min.q6_k.t.alice"
    assert str(constraint_of_queue(queue)) == "min:Q6_K"
    dev = FluxModel.FLUX_1_DEV
    assert serves(dev, QuantLevel.Q8_0, queue) and not serves(dev, QuantLevel.Q4_0, queue)
    assert not serves(FluxModel.FLUX_2_KLEIN_4B, QuantLevel.Q8_0, queue), "another model's queue"
    assert tenant_queue("render.any.lora.0123456789abcdef", "alice") == "render.any.lora.0123456789abcdef"
    redis_client.delete(keys.ADDED_QUEUES)
    redis_client.hset(keys.ADDED_QUEUES, mapping={queue: 1.0, "render.any.t.Bad.Name": 1.0, "render.any.t.x": "soon"})
    registered = registered_queues(redis_client)
    assert registered == {queue: 1.0}, "names that are not queues of ours are never consumed"
    redis_client.lpush(queue, b"a message")
    assert forget_idle_queues(redis_client, registered, {queue}) == [], "a job waits there"
    redis_client.delete(queue)
    redis_client.hset(keys.ADDED_QUEUES, queue, 2.0)  # a sender noted it after the registry was read
    assert forget_idle_queues(redis_client, registered, {queue}) == []
    # Consumed by every worker of a fitting level, yet forgotten once idle: the workers then leave it.
    assert forget_idle_queues(redis_client, registered_queues(redis_client), {queue}) == [queue]
    assert queue not in registered_queues(redis_client)
