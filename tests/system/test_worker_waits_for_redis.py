"""A worker started while Redis is down (restarting, or not up yet in a compose file) waits for it and then
serves, where its first read of the queue registry used to end the process with a traceback: the chaos run
of 2026-12-06 lost a worker that way, launched inside the two seconds of its Redis restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess, free_port
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import WORKER_READY_TIMEOUT_S, S3Server, farm_env, farm_settings
from tests.fault_farm import wait_until

pytestmark = pytest.mark.slow


def _worker_args(tiny_model: Path) -> list[str]:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    return ["--model", str(tiny_model), "--device", "cpu", "--transformer", str(gguf_path(tiny_model, QuantLevel.Q8_0))]


def test_a_worker_started_before_redis_waits_for_it_then_renders(
    tiny_model: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port())
    settings = farm_settings(server, s3_server, tmp_path)
    args = _worker_args(tiny_model)
    worker = WorkerProcess(args, {**farm_env(settings), "FLUXFARM_WORKER_NAME": "w-early"}, tmp_path / "w.log")
    worker.start()
    try:
        wait_until(lambda: "Redis unreachable" in worker.log_text(), 120, "the worker to say it waits for Redis")
        assert worker.process is not None and worker.process.poll() is None, worker.log_text()[-3000:]
        server.start()
        worker.wait_ready(WORKER_READY_TIMEOUT_S)
        with FarmClient(settings) as client:
            handle = client.submit({"prompt": "a lamp left on", "width": 256, "height": 256, "steps": 1})
            assert handle.result(timeout=120).job_id == handle.job_id
        assert "Traceback" not in worker.log_text()
    finally:
        worker.stop()
        server.stop()


def test_a_worker_with_a_wrong_password_exits_with_one_line_instead_of_waiting(
    tiny_model: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    """Waiting for Redis is for Redis that is not up yet; a password it refuses ends the worker at once."""
    server = RedisServer(tmp_path / "redis", port=free_port()).start()
    try:
        redis.Redis.from_url(server.url).config_set("requirepass", "the-right-one")
        settings = farm_settings(server, s3_server, tmp_path).model_copy(
            update={"broker_url": server.url.replace("redis://", "redis://:not-the-right-one@", 1)}
        )
        args = _worker_args(tiny_model)
        worker = WorkerProcess(args, {**farm_env(settings), "FLUXFARM_WORKER_NAME": "w-refused"}, tmp_path / "w.log")
        worker.start()
        assert worker.process is not None
        code = worker.process.wait(timeout=120)
        text = worker.log_text()
        assert code != 0, text[-3000:]
        assert "Redis refused this worker" in text and "Redis unreachable" not in text, text[-3000:]
        assert "Traceback" not in text and "not-the-right-one" not in text, text[-3000:]
    finally:
        server.stop()
