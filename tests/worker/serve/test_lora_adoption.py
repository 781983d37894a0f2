"""LoRA-set queues: routing, the registry, the fleet report, the lost-job sweep, and the policy by which
workers adopt them, on a real Redis (other workers are their heartbeats; messages are real kombu
messages published by the client)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import waiting_messages
from fluxfarm.shared.fleet import WorkerStatus, fleet_report, publish_heartbeat, read_workers
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.queue_registry import forget_idle_queues, known_queues, registered_queues
from fluxfarm.shared.routing import constraint_of_queue, queues_for_level, split_lora_queue
from fluxfarm.worker.serve.lost_jobs import LostJobSweeper
from fluxfarm.worker.serve.queue_adoption import QueueAdoption

DEV = FluxModel.FLUX_1_DEV

BASE = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2}


def _job(weight: float | None, quant: str = "auto", seed: int = 0) -> RenderJob:
    loras = [] if weight is None else [{"source": "hf://owner/style/style.safetensors", "weight": weight}]
    return parse_job({**BASE, "seed": seed, "quant": quant, "loras": loras})


@pytest.fixture
def client(redis_server) -> redis.Redis:
    connection = redis.Redis.from_url(redis_server.url)
    connection.flushdb()
    return connection


@pytest.fixture
def farm_client(redis_server, client, tmp_path):
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path}/out")
    with FarmClient(settings) as farm:
        yield farm


def _worker(node: str, level: QuantLevel, queues: list[str]) -> WorkerStatus:
    now = datetime.now(UTC)
    return WorkerStatus(
        node=node,
        hostname="h",
        device="cpu",
        gpu_name=None,
        vram_gib=None,
        level=level,
        model="m",
        queues=queues,
        started_at=now,
        last_seen=now,
    )


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[list[str], list[str]]] = []

    def __call__(self, added: list[str], cancelled: list[str]) -> None:
        self.changes.append((added, cancelled))


def _adoption(
    client: redis.Redis, node: str = "w1", level: QuantLevel = QuantLevel.Q8_0, carried: str | None = None, grace_s=60
) -> tuple[QueueAdoption, Recorder]:
    recorder = Recorder()
    return QueueAdoption(client, node, DEV, level, lambda: carried, recorder, grace_s=grace_s), recorder


def test_a_lora_job_goes_to_its_sets_queue_under_its_constraint() -> None:
    plain, styled = _job(None), _job(0.8)
    assert plain.queue == "render.any"
    assert styled.queue == f"render.any.lora.{styled.lora_set}"
    assert _job(0.5).queue != styled.queue  # another weight, another set
    exact = _job(0.8, quant="exact:Q8_0")
    assert exact.queue == f"render.exact.q8_0.lora.{exact.lora_set}"
    assert split_lora_queue(exact.queue) == ("render.exact.q8_0", exact.lora_set)
    assert str(constraint_of_queue(exact.queue)) == "exact:Q8_0"


def test_senders_register_lora_queues_and_the_registry_forgets_idle_ones(farm_client, client) -> None:
    styled = _job(0.8)
    farm_client.submit_many([styled, _job(None, seed=1)])
    assert set(registered_queues(client)) == {styled.queue}
    assert styled.queue in known_queues(client) and "render.any" in known_queues(client)
    assert waiting_messages(client, [styled.queue, "render.any"]) == [1, 1]
    assert forget_idle_queues(client, registered_queues(client), set(), idle_s=0) == []  # a job still waits there
    client.delete(*[name for name in client.keys(f"{styled.queue}*")])
    assert forget_idle_queues(client, registered_queues(client), {styled.queue}, idle_s=0) == []  # a worker consumes it
    assert forget_idle_queues(client, registered_queues(client), set(), idle_s=3600) == []  # sent to recently
    assert forget_idle_queues(client, registered_queues(client), set(), idle_s=0) == [styled.queue]
    assert client.hlen(keys.ADDED_QUEUES) == 0


def test_the_sweeper_sees_jobs_waiting_in_lora_queues(farm_client, client) -> None:
    """A job waiting in its set's queue is not lost: sending it again would duplicate it."""
    farm_client.submit_many([_job(0.8)])
    resent: list[str] = []
    sweeper = LostJobSweeper(client, farm_client.datasets, lambda sent: resent.append(sent.job["id"]), 0, 1)
    assert sweeper.sweep_once() == [] and resent == []


def test_a_lora_queue_waiting_for_adoption_is_served_only_if_a_fitting_worker_lives(farm_client, client) -> None:
    job = _job(0.8, quant="exact:Q8_0")
    farm_client.submit_many([job])
    publish_heartbeat(client, _worker("w-q4", QuantLevel.Q4_K, queues_for_level(QuantLevel.Q4_K)))
    [queue] = [q for q in fleet_report(client).queues if q.name == job.queue]
    assert queue.unserved and queue.adopters == []
    publish_heartbeat(client, _worker("w-q8", QuantLevel.Q8_0, queues_for_level(QuantLevel.Q8_0)))
    [queue] = [q for q in fleet_report(client).queues if q.name == job.queue]
    assert not queue.unserved and queue.adopters == ["w-q8"] and queue.consumers == []


def test_the_worker_carrying_a_set_adopts_its_orphaned_queue_alone_then_returns(farm_client, client) -> None:
    job = _job(0.8)
    farm_client.submit_many([job, _job(0.8, seed=1)])
    adoption, changes = _adoption(client, carried=job.lora_set)
    base = queues_for_level(QuantLevel.Q8_0)
    assert adoption.queues == base
    adoption.tick()
    assert adoption.queues == [job.queue]
    assert changes.changes == [([job.queue], base)]  # the set's queue alone: no base jobs in between
    adoption.tick()
    assert adoption.queues == [job.queue]  # stays while jobs wait
    client.delete(*client.keys(f"{job.queue}*"))
    adoption.tick()
    assert adoption.queues == base
    assert changes.changes[-1] == (base, [job.queue])


def test_a_set_nobody_carries_is_adopted_at_once(farm_client, client) -> None:
    job = _job(0.8)
    farm_client.submit_many([job])
    adoption, _ = _adoption(client, carried=None, grace_s=60)
    adoption.tick()
    assert adoption.lora_queue == job.queue


def test_another_worker_waits_for_the_grace_period_when_a_live_worker_carries_the_set(farm_client, client) -> None:
    job = _job(0.8)
    farm_client.submit_many([job])
    carrier = _worker("w-carrier", QuantLevel.Q8_0, queues_for_level(QuantLevel.Q8_0))
    publish_heartbeat(client, carrier.model_copy(update={"lora_set": job.lora_set}))
    adoption, _ = _adoption(client, carried=None, grace_s=0.3)
    adoption.tick()
    assert adoption.lora_queue is None  # the carrier gets the first chance
    time.sleep(0.35)
    adoption.tick()
    assert adoption.lora_queue == job.queue  # it did not take it: no set waits long


def test_one_worker_adopts_an_orphan_not_all(farm_client, client) -> None:
    job = _job(0.8)
    farm_client.submit_many([job])
    first, _ = _adoption(client, "w1", grace_s=0)
    second, _ = _adoption(client, "w2", grace_s=0)
    first.tick()
    second.tick()
    assert first.lora_queue == job.queue and second.lora_queue is None


def test_an_idle_worker_joins_a_crowded_queue_and_a_busy_one_does_not(farm_client, client) -> None:
    styled = [_job(0.8, seed=seed) for seed in range(3)]
    farm_client.submit_many(styled)
    publish_heartbeat(client, _worker("w-other", QuantLevel.Q8_0, [styled[0].queue]))
    busy, _ = _adoption(client, "w-busy", grace_s=0)
    farm_client.submit_many([_job(None, seed=9)])  # waits in render.any, which w-busy serves
    busy.tick()
    assert busy.lora_queue is None
    client.delete(*client.keys("render.any"), *client.keys("render.any:*"))
    idle, _ = _adoption(client, "w-idle", grace_s=0)
    idle.tick()
    assert idle.lora_queue == styled[0].queue  # 3 waiting, 1 consumer


def test_a_worker_only_adopts_queues_its_level_serves_and_leaves_them_on_a_step_down(farm_client, client) -> None:
    job = _job(0.8, quant="min:Q8_0")
    farm_client.submit_many([job])
    low, _ = _adoption(client, "w-q4", QuantLevel.Q4_K, carried=job.lora_set, grace_s=0)
    low.tick()
    assert low.lora_queue is None
    high, changes = _adoption(client, "w-q8", QuantLevel.Q8_0, carried=job.lora_set, grace_s=0)
    high.tick()
    assert high.lora_queue == job.queue
    high.set_level(QuantLevel.Q4_K)
    assert high.lora_queue is None and high.queues == queues_for_level(QuantLevel.Q4_K)
    assert changes.changes[-1] == (queues_for_level(QuantLevel.Q4_K), [job.queue])


def test_urgent_base_jobs_keep_every_worker_off_less_urgent_sets(farm_client, client) -> None:
    """Issue 18, finding 7: with 500 high-priority base jobs waiting, three one-job LoRA sets took all
    three workers."""
    farm_client.submit_many([_job(None, seed=seed) for seed in range(5)], priority="high")
    sets = [_job(weight) for weight in (0.5, 0.6, 0.7)]
    farm_client.submit_many(sets)
    workers = [_adoption(client, f"w{i}", grace_s=0)[0] for i in range(3)]
    for worker in workers:
        worker.tick()
    assert [worker.lora_queue for worker in workers] == [None, None, None]
    urgent = _job(0.9)
    farm_client.submit_many([urgent], priority="high")
    workers[0].tick()
    assert workers[0].lora_queue == urgent.queue, "as urgent as the base jobs, and the fleet has room for it"
    client.delete(*client.keys("render.any"), *client.keys("render.any:*"))
    for worker in workers[1:]:
        worker.tick()
    adopted = [worker.lora_queue for worker in workers[1:]]
    assert len(set(adopted)) == 2 and set(adopted) <= {job.queue for job in sets}, "base drained: sets are served"


def test_equally_urgent_sets_take_at_most_their_share_of_the_fleet(farm_client, client) -> None:
    farm_client.submit_many([_job(None, seed=seed) for seed in range(5)])
    sets = [_job(weight) for weight in (0.5, 0.6)]
    farm_client.submit_many(sets)
    on_set = _worker("w-on-set", QuantLevel.Q8_0, [sets[0].queue])
    publish_heartbeat(client, on_set)
    publish_heartbeat(client, _worker("w-base", QuantLevel.Q8_0, queues_for_level(QuantLevel.Q8_0)))
    publish_heartbeat(client, _worker("w-base-2", QuantLevel.Q8_0, queues_for_level(QuantLevel.Q8_0)))
    quarter = QueueAdoption(client, "w-me", DEV, QuantLevel.Q8_0, lambda: None, Recorder(), grace_s=0, fleet_share=0.25)
    quarter.tick()
    assert quarter.lora_queue is None, "one of four on sets is a quarter already"
    half = QueueAdoption(client, "w-me", DEV, QuantLevel.Q8_0, lambda: None, Recorder(), grace_s=0, fleet_share=0.5)
    half.tick()
    assert half.lora_queue == sets[1].queue


def test_a_stint_ends_at_its_cap_when_base_jobs_wait(farm_client, client) -> None:
    styled = [_job(0.8, seed=seed) for seed in range(3)]
    farm_client.submit_many(styled)
    capped = QueueAdoption(client, "w-me", DEV, QuantLevel.Q8_0, lambda: None, Recorder(), grace_s=0, stint_max_s=0.2)
    capped.tick()
    assert capped.lora_queue == styled[0].queue
    time.sleep(0.25)
    capped.tick()
    assert capped.lora_queue == styled[0].queue, "no base job waits: the stint goes on"
    farm_client.submit_many([_job(None, seed=7)])
    capped.tick()
    assert capped.lora_queue is None and capped.queues == queues_for_level(QuantLevel.Q8_0)
    capped.tick()
    assert capped.lora_queue is None, "it rests from equally urgent sets for a stint"


def test_levels_read_back_typed_and_a_level_of_another_version_is_skipped(client: redis.Redis) -> None:
    """A worker's level is a `QuantLevel` on both ends; the wire keeps its name."""
    publish_heartbeat(client, _worker("w-q4", QuantLevel.Q4_K, []))
    assert json.loads(client.get(keys.worker("w-q4")))["level"] == "Q4_K"
    future = json.loads(_worker("w-new", QuantLevel.Q8_0, []).model_dump_json()) | {"level": "Q1_FUTURE"}
    client.set(keys.worker("w-new"), json.dumps(future))
    (worker,) = read_workers(client)
    assert worker.node == "w-q4" and worker.level is QuantLevel.Q4_K
