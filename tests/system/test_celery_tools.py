"""Celery's own tools see the farm as shipped (issue 29): the documented `celery -A fluxfarm.celery inspect`
commands and a real Flower started with the compose file's command and environment, against a farm on a
real redis-server with the compose file's ACL users (infra/redis/start.sh) and a worker as compose runs it
(remote control on, its own Redis user)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import free_port
from fluxfarm.shared.celery_app import QUEUE_ANY, task_id
from fluxfarm.shared.ladder import QuantLevel
from tests.compose_files import interpolate
from tests.conftest import S3Server, start_worker
from tests.host_settings import HostSettings
from tests.redis_users import PASSWORDS, AclRedis

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).parent / "celery")
FLOWER = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
NODE = "w-celery-tools"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def farm_settings(
    acl_redis: AclRedis,
    s3_server: S3Server,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostSettings]:
    """A worker as compose runs it: its own Redis user, remote control on. Yields a producer's settings."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    work = tmp_path_factory.mktemp("celery-tools")
    common = {
        "storage_url": f"s3://{s3_server.new_bucket()}/renders",
        "s3_endpoint_url": s3_server.endpoint_url,
        "cache_dir": work / "cache",
    }
    worker = start_worker(
        HostSettings(broker_url=acl_redis.url("worker"), **common),
        tiny_model,
        gguf_path(tiny_model, QuantLevel.Q8_0),
        work / "worker.log",
        NODE,
        {"FLUXFARM_REMOTE_CONTROL": "true"},
    )
    yield HostSettings(broker_url=acl_redis.url("producer"), **common)
    worker.stop()


def _celery(*args: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLUXFARM_BROKER_URL": broker_url}
    return subprocess.run([CELERY, "-A", "fluxfarm.celery", *args], env=env, capture_output=True, text=True, timeout=60)


def test_the_documented_inspect_commands_see_the_worker(acl_redis: AclRedis, farm_settings: HostSettings) -> None:
    """Before: `celery --broker redis://... inspect ping` answered 'No nodes replied within time constraint'."""
    ping = _celery("inspect", "ping", "--timeout", "10", broker_url=acl_redis.url("flower"))
    assert ping.returncode == 0 and f"celery@{NODE}: OK" in ping.stdout, ping.stdout + ping.stderr
    queues = _celery("inspect", "active_queues", "--json", "--timeout", "10", broker_url=acl_redis.url("flower"))
    assert queues.returncode == 0, queues.stderr
    consumed = {queue["name"] for queue in json.loads(queues.stdout)[f"celery@{NODE}"]}
    assert QUEUE_ANY in consumed
    # Seen by the tools, yet started without mingle's exchange with other workers (a second before the first
    # job, run 12) and without gossip (runtime.celery_argv).
    log = (farm_settings.cache_dir.parent / "worker.log").read_text()
    assert " ready." in log and "mingle" not in log, log[-2000:]


def _flower_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The compose file's flower service, with this machine's port and the test's passwords."""
    values = {f"REDIS_{user.upper()}_PASSWORD": password for user, password in PASSWORDS.items()}
    values |= {"FLOWER_USER": "ops", "FLOWER_PASSWORD": "flower-test-secret"}
    service = interpolate(FLOWER, values)
    full = [*service["entrypoint"], *service["command"]]
    command = [arg if not arg.startswith("--port=") else f"--port={port}" for arg in full]
    return command, {key: str(value) for key, value in service["environment"].items()}


def _get(url: str) -> Any:
    request = urllib.request.Request(
        url, headers={"Authorization": "Basic " + base64.b64encode(b"ops:flower-test-secret").decode()}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _poll(url: str, done: Callable[[Any], bool], timeout_s: float = 90.0) -> Any:
    """GET `url` (JSON) every second until `done` says so of the answer or `timeout_s` passes; the last answer."""
    deadline, found = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = _get(url)
        if done(found):
            break
        time.sleep(1)
    return found


def test_flower_as_compose_runs_it_lists_the_worker_and_the_finished_job(
    acl_redis: AclRedis,
    farm_settings: HostSettings,
    tmp_path: Path,
) -> None:
    """Before: Flower showed the tasks but `/api/workers` was `{}` ('Inspect method ... failed')."""
    port = free_port()
    command, environment = _flower_command(port)
    broker = environment["FLUXFARM_BROKER_URL"].replace("@redis:6379", f"@127.0.0.1:{acl_redis.port}")
    env = {**os.environ, **environment, "FLUXFARM_BROKER_URL": broker}
    assert command[:3] == ["celery", "-A", "fluxfarm.celery"], command
    log = tmp_path / "flower.log"
    with log.open("w") as out:
        flower = subprocess.Popen([CELERY, *command[1:]], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Flower learns of tasks from the events it receives once it is up: the job goes after Flower answers
        # (under load its start took longer than the job, whose events it then never saw).
        workers = _poll(f"http://127.0.0.1:{port}/api/workers?refresh=1", lambda found: f"celery@{NODE}" in found)
        assert f"celery@{NODE}" in workers, log.read_text()[-3000:]
        with FarmClient(farm_settings) as client:
            handle = client.submit({"prompt": "seen by flower", "width": 256, "height": 256, "steps": 2})
            handle.result(TIMEOUT_S)
        job = task_id(handle.job.dataset, handle.job_id)  # its started and succeeded events come one by one
        tasks = _poll(f"http://127.0.0.1:{port}/api/tasks", lambda found: found.get(job, {}).get("state") == "SUCCESS")
        active = {queue["name"] for queue in workers[f"celery@{NODE}"]["active_queues"]}
        assert QUEUE_ANY in active
        assert tasks[job]["state"] == "SUCCESS", tasks.get(job)
    finally:
        flower.terminate()
        flower.wait(timeout=30)
    denied = [entry for entry in acl_redis.client("admin").acl_log() if entry["username"] == "flower"]
    assert not denied, denied
