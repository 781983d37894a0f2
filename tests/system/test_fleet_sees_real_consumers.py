"""The fleet report lists the queues each worker's Celery consumer really reads (issue 18, finding 8:
after a `cancel_consumer`, the worker stopped taking jobs while `fluxfarm status` kept reporting the queue
as served, from fluxfarm's own list)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.shared.celery_app import QUEUE_ANY, make_celery_app
from fluxfarm.shared.fleet import HEARTBEAT_INTERVAL_S, QueueStatus, fleet_report
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import S3Server, fresh_farm_settings, start_worker

pytestmark = pytest.mark.slow


def _any_queue(client: redis.Redis) -> QueueStatus | None:
    return next((queue for queue in fleet_report(client).queues if queue.name == QUEUE_ANY), None)


def test_a_cancelled_consumer_shows_as_an_unserved_queue(
    tiny_model: Path, redis_server, s3_server: S3Server, tmp_path: Path
) -> None:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/renders", tmp_path)
    env = {"FLUXFARM_REMOTE_CONTROL": "true"}  # an operator's Flower, as compose ships it
    worker = start_worker(
        settings, tiny_model, gguf_path(tiny_model, QuantLevel.Q8_0), tmp_path / "worker.log", "w-consumers", env
    )
    client = redis.Redis.from_url(settings.broker_url)
    app = make_celery_app(settings.model_copy(update={"remote_control": True}))
    try:
        deadline = time.monotonic() + 30
        while (queue := _any_queue(client)) is None or queue.consumers != ["w-consumers"]:
            assert time.monotonic() < deadline, fleet_report(client)
            time.sleep(0.5)
        replies = app.control.cancel_consumer(QUEUE_ANY, destination=["celery@w-consumers"], reply=True, timeout=10)
        assert replies, "the worker answered the control command"
        time.sleep(3 * HEARTBEAT_INTERVAL_S)
        with FarmClient(settings) as farm:
            farm.submit({"prompt": "waits", "width": 256, "height": 256, "steps": 2})
        queue = _any_queue(client)
        assert queue is not None and queue.consumers == [] and queue.unserved, "the report follows the consumer"
    finally:
        app.close()
        worker.stop()
