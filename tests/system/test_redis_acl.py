"""The compose file's Redis users, tested against a real redis-server started by infra/redis/start.sh with
infra/redis/users.acl (issue 18, finding 8): the producer submits, waits and cancels through `fluxfarm`
and cannot administer Redis, read what is not its own nor reach Celery's control channel; the worker
renders with its own user; the exporter reads and writes nothing."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import WorkerProcess, free_port
from fluxfarm.shared.celery_app import make_celery_app
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import FLUXFARM, S3Server, farm_env, run_fluxfarm, start_worker
from tests.host_settings import HostSettings
from tests.redis_users import START, AclRedis, password_env

pytestmark = pytest.mark.slow

JOB = ["--width", "256", "--height", "256", "--steps", "2"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def producer_settings(
    acl_redis: AclRedis, s3_server: S3Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostSettings]:
    """A worker on the worker user; the settings a producer holds (the producer user)."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    work = tmp_path_factory.mktemp("acl-farm")
    storage = f"s3://{s3_server.new_bucket()}/renders"
    common = {"storage_url": storage, "s3_endpoint_url": s3_server.endpoint_url, "cache_dir": work / "cache"}
    worker_settings = HostSettings(broker_url=acl_redis.url("worker"), **common)
    worker: WorkerProcess = start_worker(
        worker_settings, tiny_model, gguf_path(tiny_model, QuantLevel.Q8_0), work / "worker.log", "w-acl"
    )
    yield HostSettings(broker_url=acl_redis.url("producer"), **common)
    worker.stop()
    denied = acl_redis.client("admin").acl_log()
    assert not [entry for entry in denied if entry["username"] == "worker"], f"the worker was denied: {denied}"


def test_the_producer_submits_waits_and_cancels_through_fluxfarm(producer_settings: HostSettings) -> None:
    env = farm_env(producer_settings)
    done = run_fluxfarm("submit", "--prompt", "a lighthouse", *JOB, "--dataset", "acl", "--wait", env=env)
    assert done.returncode == 0, done.stderr
    status = run_fluxfarm("status", env=env)
    assert status.returncode == 0 and "acl" in status.stdout, status.stderr
    with FarmClient(producer_settings) as client:
        result = client.submit({"prompt": "a harbour", "width": 256, "height": 256, "steps": 2}).result(TIMEOUT_S)
        assert result.job.prompt == "a harbour"
    cancelled = run_fluxfarm("cancel", "--dataset", "acl", env=env)
    assert cancelled.returncode == 0, cancelled.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("CONFIG", "GET", "maxmemory"),
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("HGETALL", "unacked"),  # every job in flight, prompts and all
        ("GET", "fluxfarm:claim:acl:x"),
        ("SET", "fluxfarm:worker:fake", "{}"),  # a forged heartbeat
        ("ACL", "LIST"),
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_the_producer_cannot_administer_redis_or_read_what_is_not_its_own(
    acl_redis: AclRedis, producer_settings: HostSettings, command: tuple[str, ...]
) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("producer").execute_command(*command)


def test_the_producer_cannot_stop_a_worker_consuming(producer_settings: HostSettings) -> None:
    """Before: with only a producer's broker URL, `cancel_consumer` silently stopped a worker taking jobs."""
    app = make_celery_app(producer_settings)
    try:
        with pytest.raises(OperationalError, match="no permissions to access one of the channels"):
            app.control.cancel_consumer("render.any", reply=False)
    finally:
        app.close()
    with FarmClient(producer_settings) as client:
        job = {"prompt": "still served", "width": 256, "height": 256, "steps": 2}
        assert client.submit(job).result(TIMEOUT_S).job.prompt == "still served"


def test_the_exporter_reads_the_farm_and_writes_nothing(acl_redis: AclRedis, producer_settings: HostSettings) -> None:
    port = free_port()
    env = {**os.environ, **farm_env(producer_settings), "FLUXFARM_BROKER_URL": acl_redis.url("exporter")}
    process = subprocess.Popen(
        [FLUXFARM, "exporter", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline, page = time.monotonic() + 60, ""
        while not page and time.monotonic() < deadline:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.3)
        assert "fluxfarm_dataset_jobs" in page
        assert "fluxfarm_redis_used_memory_bytes" in page, "the exporter's user may read INFO memory"
    finally:
        process.terminate()
        process.wait(timeout=30)
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("exporter").set("fluxfarm:datasets", "x")


def test_a_placeholder_or_missing_password_stops_redis_at_start(tmp_path: Path) -> None:
    env = {**os.environ, **password_env(), "REDIS_ACL_FILE": str(tmp_path / "users.acl")}
    placeholder = subprocess.run(
        [str(START), "--port", str(free_port())],
        env={**env, "REDIS_PRODUCER_PASSWORD": "change-me"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert placeholder.returncode == 1 and "REDIS_PRODUCER_PASSWORD is still the placeholder" in placeholder.stderr
    missing = {name: value for name, value in env.items() if name != "REDIS_FLOWER_PASSWORD"}
    absent = subprocess.run([str(START)], env=missing, capture_output=True, text=True, timeout=30)
    assert absent.returncode == 1 and "REDIS_FLOWER_PASSWORD is not set" in absent.stderr


def test_the_gateway_serves_a_token_holder_on_its_own_redis_user(
    acl_redis: AclRedis, producer_settings: HostSettings, tmp_path: Path
) -> None:
    """The compose file's gateway: tokens, submits, long-poll waits, result pages and exports on the
    `gateway` user, with nothing denied; the producer user may not read the tokens."""
    from tests.gateway_process import running_gateway

    settings = producer_settings.model_copy(update={"broker_url": acl_redis.url("gateway")})
    with running_gateway(settings, tmp_path / "gateway.log") as gateway:
        token = gateway.token("team", "--datasets", "team-*", "--max-queued", "10")
        with gateway.client(token) as http:
            job = {"prompt": "a heron", "dataset": "team-acl", "width": 256, "height": 256, "steps": 2}
            sent = http.post("/v1/jobs", json=job)
            assert sent.status_code == 202, sent.text
            job_id = sent.json()["jobs"][0]["job_id"]
            view = http.get(f"/v1/jobs/{job_id}", params={"dataset": "team-acl", "wait": 60}).json()
            assert view["state"] == "done", view
            assert http.get("/v1/datasets/team-acl/results").json()["results"][0]["job_id"] == job_id
            export = http.post("/v1/datasets/team-acl/exports", json={"format": "jsonl"}).json()
            deadline = time.monotonic() + 60
            while http.get(f"/v1/datasets/team-acl/exports/{export['export_id']}").json()["state"] != "done":
                assert time.monotonic() < deadline, "the export did not finish"
                time.sleep(0.2)
    denied = [entry for entry in acl_redis.client("admin").acl_log() if entry["username"] == "gateway"]
    assert not denied, denied
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("producer").hgetall("fluxfarm:tokens")
