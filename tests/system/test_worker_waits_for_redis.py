"""A worker started while Redis is down (restarting, or not up yet in a compose file) waits for it and then
serves, where its first read of the queue registry used to end the process with a traceback: the chaos run
of 2026-12-06 lost a worker that way, launched inside the two seconds of its Redis restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess, free_port
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import WORKER_READY_TIMEOUT_S, S3Server, farm_env, farm_settings
from tests.fault_farm import wait_until

pytestmark = pytest.mark.slow


def test_a_worker_started_before_redis_waits_for_it_then_renders(
    tiny_model: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    server = RedisServer(tmp_path / "redis", port=free_port())
    settings = farm_settings(server, s3_server, tmp_path)
    args = ["--model", str(tiny_model), "--device", "cpu", "--transformer", str(gguf_path(tiny_model, QuantLevel.Q8_0))]
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
