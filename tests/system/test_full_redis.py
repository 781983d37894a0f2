"""A full Redis (maxmemory with noeviction, as the compose file runs it) never costs a render (issue 30,
point 3): a worker whose bookkeeping write is refused keeps the stored result, goes on, and once there is
room the job is recorded done from storage, not rendered a second time. A real worker process on a real
redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.settings import FarmSettings
from tests.conftest import S3Server, start_worker
from tests.fault_farm import wait_until

pytestmark = pytest.mark.slow

JOB = {"prompt": "rendered into a full redis", "width": 256, "height": 256, "steps": 2, "dataset": "full"}


def _fill(admin: redis.Redis) -> None:
    """Redis full: a cap below what it holds refuses every write that needs memory (noeviction), as a
    Redis filled by producers does, whatever its clients' buffers hold at the moment."""
    admin.config_set("maxmemory", 1)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("probe", "x")


def test_a_worker_keeps_what_it_rendered_when_redis_is_full(
    tiny_model: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    server = RedisServer(tmp_path / "redis").start()
    settings = FarmSettings(
        broker_url=server.url,
        storage_url=f"s3://{s3_server.new_bucket()}/renders",
        s3_endpoint_url=s3_server.endpoint_url,
        cache_dir=tmp_path / "cache",
    )
    env = {"FLUXFARM_INJECT_FAULTS": json.dumps({"slow_denoise_s": 8}), "FLUXFARM_LEASE_S": "5"}
    worker = start_worker(
        settings, tiny_model, gguf_path(tiny_model, QuantLevel.Q8_0), tmp_path / "w.log", "w-full", env
    )
    admin = redis.Redis.from_url(server.url)
    try:
        with FarmClient(settings) as client:
            handle = client.submit(JOB)
            attempts = "fluxfarm:dataset:full:attempts"
            wait_until(lambda: admin.hget(attempts, handle.job_id) == b"1", 60, "the render to begin")
            _fill(admin)
            wait_until(lambda: client.stored_result(handle.job) is not None, 120, "the image and metadata in storage")
            wait_until(lambda: "not written, Redis is full" in worker.log_text(), 60, "the refused bookkeeping")
            assert client.datasets.record("full").done == 0
            admin.config_set("maxmemory", 0)
            wait_until(lambda: client.datasets.record("full").done == 1, 120, "the job recorded done from storage")
        log = worker.log_text()
        assert log.count(f"rendered job {handle.job_id}") == 1, "rendered once, never again for nothing"
        assert worker.process is not None and worker.process.poll() is None, "the worker went on"
    finally:
        worker.stop()
        server.stop()
