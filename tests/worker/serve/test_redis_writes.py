"""A worker's bookkeeping writes against a real redis-server that stops answering: skipped and said, not raised."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.worker.serve.redis_writes import unless_redis_is_down


def test_a_write_that_times_out_is_said_and_skipped_like_one_that_cannot_connect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that takes writes but answers none in time (paused clients here; a saturated or failing-over
    server in a farm) raises TimeoutError, not ConnectionError: both mean the write may be lost and storage
    holds the truth, so neither may fail a job whose image is stored."""
    caplog.set_level(logging.WARNING)
    with RedisServer(tmp_path) as server:
        admin = redis.Redis.from_url(server.url)
        impatient = redis.Redis.from_url(server.url, socket_timeout=0.2)
        admin.client_pause(1500, all=False)  # write commands wait 1.5 s
        assert unless_redis_is_down(lambda: impatient.set("done", "1"), "job x's done record") is False
        assert "job x's done record not written, Redis is unreachable or did not answer" in caplog.text
        time.sleep(1.6)
        assert unless_redis_is_down(lambda: impatient.set("done", "1"), "job x's done record") is True
        assert admin.get("done") == b"1"
        server.stop()
        assert unless_redis_is_down(lambda: impatient.set("done", "2"), "job y's done record") is False
        assert "job y's done record not written" in caplog.text
