"""The farm's kombu transport frees a worker's prefetch slot whatever Redis says about the ack, on a real
redis-server (with AOF, as docker-compose.yml runs it) stopped under the consumer and started again."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from kombu import Connection

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared import keys
from fluxfarm.shared.redis_transport import TRANSPORT


@pytest.mark.parametrize("settle", ["ack", "reject", "requeue"])
def test_an_ack_redis_could_not_take_frees_the_slot_and_leaves_the_message_unacked(tmp_path: Path, settle: str) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        with Connection(server.url, transport=TRANSPORT) as connection:
            queue = connection.SimpleQueue("render.test")
            queue.put({"job": 1})
            message = queue.get(timeout=5)
            qos = message.channel.qos
            qos.prefetch_count = 1
            assert not qos.can_consume(), "the one delivery fills a window of one"
            server.stop()
            with pytest.raises(redis.ConnectionError):
                if settle == "ack":
                    message.ack()
                else:
                    message.reject(requeue=settle == "requeue")
            assert qos.can_consume(), "the slot is free: the worker goes on asking for messages"
            server.start()
            client = redis.Redis.from_url(server.url)
            assert client.hexists(keys.UNACKED, message.delivery_tag), "it comes back after its lease"
            client.close()
            queue.close()
    finally:
        server.stop()
