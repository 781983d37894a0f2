"""Two workers on one Redis, one holding Q8_0 and one Q4_0: each job goes only where its level allows."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.job_handles import JobHandle
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.shared.celery_app import RENDER_TASK, queue_lists
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.fleet import HEARTBEAT_TTL_S
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import WORKER_READY_TIMEOUT_S, S3Server, farm_env, fresh_farm_settings, run_fluxfarm
from tests.host_settings import HostSettings

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 240


@dataclass(frozen=True)
class Fleet:
    settings: HostSettings
    workers: dict[str, WorkerProcess]

    def status(self) -> dict:
        done = run_fluxfarm("status", "--json", env=farm_env(self.settings), timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["fleet"]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server: RedisServer, s3_server: S3Server
) -> Iterator[Fleet]:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    work = tmp_path_factory.mktemp("fleet")
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/fleet", work)
    workers = {}
    for level in (QuantLevel.Q8_0, QuantLevel.Q4_0):
        name = f"w-{level.value.lower()}@test"
        args = ["--model", str(tiny_model), "--transformer", str(gguf_path(tiny_model, level)), "--device", "cpu"]
        env = {**farm_env(settings), "FLUXFARM_WORKER_NAME": name}
        workers[level.value] = WorkerProcess(args, env, work / f"{level.value}.log").start()
    for worker in workers.values():
        worker.wait_ready(WORKER_READY_TIMEOUT_S)
    yield Fleet(settings=settings, workers=workers)
    for worker in workers.values():
        worker.stop()


def _job(i: int, quant: str, size: int = 256, steps: int = 2) -> dict:
    return {"prompt": f"routing {quant} {i}", "quant": quant, "width": size, "height": size, "steps": steps}


def test_jobs_go_only_to_workers_whose_level_satisfies_them(fleet: Fleet) -> None:
    auto = [_job(i, "auto", steps=3) for i in range(6)]
    constrained = [_job(i, q) for q in ("exact:Q8_0", "min:Q6_K", "exact:Q4_0", "min:Q4_1") for i in range(2)]
    with FarmClient(fleet.settings) as client:
        results = [handle.result(timeout=RESULT_TIMEOUT_S) for handle in client.submit_many(auto + constrained)]
    rendered_by = {}
    for result in results:
        rendered_by.setdefault(result.job.quant, set()).add((result.quant, result.worker.node))
    assert rendered_by["exact:Q8_0"] == {("Q8_0", "w-q8_0@test")}
    assert rendered_by["min:Q6_K"] == {("Q8_0", "w-q8_0@test")}
    assert rendered_by["min:Q4_1"] == {("Q8_0", "w-q8_0@test")}, "Q4_0 is below Q4_1"
    assert rendered_by["exact:Q4_0"] == {("Q4_0", "w-q4_0@test")}
    assert rendered_by["auto"] == {("Q8_0", "w-q8_0@test"), ("Q4_0", "w-q4_0@test")}, "both serve auto"


def test_a_misrouted_job_is_refused_by_the_worker(fleet: Fleet) -> None:
    job = parse_job(_job(0, "exact:Q8_0") | {"prompt": "misrouted"})
    with FarmClient(fleet.settings) as client:
        sent = client._app.send_task(
            RENDER_TASK, kwargs={"job": job.model_dump(mode="json")}, queue="render.exact.q4_0"
        )
        with pytest.raises(JobFailed, match="needs exact:Q8_0; this worker holds Q4_0"):
            JobHandle(job, async_result=sent, stored=None).result(timeout=RESULT_TIMEOUT_S)


def test_status_shows_the_fleet_and_jobs_no_live_worker_can_serve(fleet: Fleet) -> None:
    with FarmClient(fleet.settings) as client:
        client.submit(_job(0, "exact:Q6_K"))
        client.submit(_job(0, "min:bf16"))
    report = fleet.status()
    assert {(w["node"], w["level"]) for w in report["workers"]} == {("w-q8_0@test", "Q8_0"), ("w-q4_0@test", "Q4_0")}
    unserved = {q["name"]: q["waiting"] for q in report["unserved"]}
    assert unserved == {"render.exact.q6_k": 1, "render.min.bf16": 1}
    queues = {q["name"]: q for q in report["queues"]}
    assert set(queues["render.any"]["consumers"]) == {"w-q8_0@test", "w-q4_0@test"}
    assert queues["render.min.q6_k"]["consumers"] == ["w-q8_0@test"]

    env = farm_env(fleet.settings)
    table = run_fluxfarm("status", env=env, timeout=60)
    assert "unserved: 1 jobs need exact:Q6_K and no live worker serves render.exact.q6_k" in table.stdout

    small = ("--width", "256", "--height", "256")
    submitted = run_fluxfarm("submit", "--prompt", "needs Q5_K", "--quant", "exact:Q5_K", *small, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    assert "no live worker serves exact:Q5_K: 1 jobs wait in render.exact.q5_k" in submitted.stderr
    served = run_fluxfarm("submit", "--prompt", "any", "--quant", "min:Q4_0", *small, env=env, timeout=60)
    assert served.returncode == 0 and "warning" not in served.stderr
    stranded = ("render.exact.q6_k", "render.min.bf16", "render.exact.q5_k")
    redis.Redis.from_url(fleet.settings.broker_url).delete(*(name for q in stranded for name in queue_lists(q)))


def test_jobs_of_a_killed_worker_show_as_unserved_within_10_seconds(fleet: Fleet) -> None:
    """SIGKILL leaves no goodbye: the worker's heartbeat key expires and its exclusive queues go unserved."""
    worker = fleet.workers["Q4_0"]
    worker.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    with FarmClient(fleet.settings) as client:
        client.submit(_job(1, "exact:Q4_0", steps=1))
    while True:
        unserved = {q["name"] for q in fleet.status()["unserved"]}
        elapsed = time.monotonic() - killed_at
        if "render.exact.q4_0" in unserved or elapsed > 10:
            break
        time.sleep(0.5)
    assert "render.exact.q4_0" in unserved
    assert elapsed <= 10, elapsed
    assert HEARTBEAT_TTL_S < 10
