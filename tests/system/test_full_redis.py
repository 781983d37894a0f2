"""A full Redis (maxmemory with noeviction, as the compose file runs it) never costs a render (issue 30,
point 3): a worker whose bookkeeping writes are refused keeps the stored result and goes on; the job's done
record, which frees more than it takes, is written even while Redis is full; the job is rendered once. A real
worker process on a real redis-server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, free_port
from fluxfarm.shared.celery_app import QUEUE_ANY, waiting_messages
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import FLUXFARM, S3Server, farm_env, farm_settings, run_fluxfarm, start_worker
from tests.fault_farm import wait_until
from tests.gateway_process import running_gateway
from tests.metrics_scrape import scrape, start_exporter, value

pytestmark = pytest.mark.slow

JOB = {"prompt": "rendered into a full redis", "width": 256, "height": 256, "steps": 2, "dataset": "full"}


DONE_RECORD_KEYS = {f"fluxfarm:dataset:full:{name}" for name in ("meta", "done", "done_at", "levels")}


def _keyspace(admin: redis.Redis) -> dict[str, int]:
    """Every key and the bytes it holds (MEMORY USAGE)."""
    return {key.decode(): admin.memory_usage(key) or 0 for key in admin.scan_iter(count=1000)}


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
    settings = farm_settings(server, s3_server, tmp_path)
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
            before = _keyspace(admin)
            wait_until(lambda: client.stored_result(handle.job) is not None, 120, "the image and metadata in storage")
            # Recording a result is allowed in a full Redis (allow-oom): it deletes the job's sent record, larger
            # than what it adds, so the record is how a full farm drains. Nothing else the worker writes is.
            wait_until(lambda: client.datasets.record("full").done == 1, 60, "the job recorded done while full")
            assert admin.hget("fluxfarm:dataset:full:sent", handle.job_id) is None
            after = _keyspace(admin)
            # Keys, not INFO's used_memory: that swings by ~100 KiB with Redis's own buffers and scripts (the
            # done record's script loading, clients' buffers freed) and made this check fail 1 run in 2.
            assert sum(after.values()) <= sum(before.values()), "the record freed more than it took"
            grown = {key for key, size in after.items() if size > before.get(key, 0)}
            assert grown <= DONE_RECORD_KEYS, f"only the job's done record grew, not {grown - DONE_RECORD_KEYS}"
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.set("probe", "x")  # still full
            admin.config_set("maxmemory", 0)
        log = worker.log_text()
        assert log.count(f"rendered job {handle.job_id}") == 1, "rendered once, never again for nothing"
        assert worker.process is not None and worker.process.poll() is None, "the worker went on"
    finally:
        worker.stop()
        server.stop()


ROWS = 3000


def _submit_env(server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return {
        "FLUXFARM_BROKER_URL": server.url,
        "FLUXFARM_STORAGE_URL": f"file://{tmp_path / 'out'}",
        "FLUXFARM_SUBMIT_CHUNK": "100",
    }


def _prompts(path: Path, rows: int) -> Path:
    path.write_text("".join(f"a study of light on water, plate {i}\n" for i in range(rows)))
    return path


def test_a_submit_past_maxmemory_stops_with_one_line_and_a_consistent_dataset(tmp_path: Path) -> None:
    """Issue 30, acceptance 1: before, a 60,000-row submit into a full Redis ended in a traceback
    (OutOfMemoryError, or BatchPublishError) and left 609 messages the dataset record did not know."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    try:
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 3 * 1024 * 1024)
        prompts = _prompts(tmp_path / "prompts.txt", ROWS)
        env = _submit_env(server, tmp_path)
        refused = run_fluxfarm("submit", str(prompts), "--dataset", "full", env=env)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        [line] = [line for line in refused.stderr.splitlines() if "Redis is full" in line]
        assert "maxmemory" in line and "queued" in line
        book = DatasetBook(admin)
        queued = book.record("full").queued
        assert 0 < queued < ROWS
        assert waiting_messages(admin, [QUEUE_ANY]) == [queued], "the record and the queue agree"
        admin.config_set("maxmemory", 0)
        done = run_fluxfarm("submit", str(prompts), "--dataset", "full", env=env)
        assert done.returncode == 0, done.stderr
        assert book.record("full").queued == ROWS
        assert waiting_messages(admin, [QUEUE_ANY]) == [ROWS], "one message per row, none twice"
    finally:
        server.stop()


def test_wait_for_room_finishes_the_file_while_a_worker_drains_the_queue(
    tiny_model: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    """Issue 30, acceptance 2. The worker is held (SIGSTOP) until the waiting submit is seen blocked (alive,
    its dataset short of the file), so the test sees the wait itself end once the worker drains."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    settings = farm_settings(server, s3_server, tmp_path)
    transformer = gguf_path(tiny_model, QuantLevel.Q8_0)
    # Render-free (every step of a job but the model's): what is measured is room made by draining, and 700
    # tiny renders took 160 s of `make test`'s 2 cores.
    render_free = {"FLUXFARM_RENDER_FREE": "true"}
    worker = start_worker(settings, tiny_model, transformer, tmp_path / "w.log", "w-drain", render_free)
    assert worker.process is not None
    try:
        rows = 700
        # 1 MiB under the producers' line (some 450 queued jobs: well above the noise of clients' buffers
        # in used_memory), and 2 MiB above it for the worker: a Redis over maxmemory refuses even the MULTI
        # block of an ack, and no fleet could drain it.
        used = int(admin.info("memory")["used_memory"])
        limit = used + 3 * 1024 * 1024
        admin.config_set("maxmemory", limit)
        share = 1 - (used + 1024 * 1024) / limit
        prompts = _prompts(tmp_path / "prompts.txt", rows)
        env = {**farm_env(settings), "FLUXFARM_SUBMIT_CHUNK": "20", "FLUXFARM_REDIS_RESERVE_SHARE": f"{share:.3f}"}
        args = ("submit", str(prompts), "--dataset", "drain", "--width", "256", "--height", "256", "--steps", "1")
        worker.process.send_signal(signal.SIGSTOP)
        refused = run_fluxfarm(*args, env=env)
        assert refused.returncode != 0 and "Redis is full" in refused.stderr
        book = DatasetBook(admin)
        queued = book.record("drain").queued
        assert 0 < queued < rows, queued
        waiting = subprocess.Popen(
            [FLUXFARM, *args, "--wait-for-room"], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(10)  # a submit with room would have queued the rest and exited by now
            assert waiting.poll() is None, waiting.communicate()
            # What fitted went (the refused submit stopped at a chunk of 20, with room for a few jobs left).
            assert book.record("drain").queued < rows, "the rest waits for the held worker"
            worker.process.send_signal(signal.SIGCONT)
            _, stderr = waiting.communicate(timeout=240)
        finally:
            waiting.kill()
        assert waiting.returncode == 0, stderr
        wait_until(lambda: book.record("drain").done == rows, 400, "every row rendered")
    finally:
        worker.process.send_signal(signal.SIGCONT)
        worker.stop()
        server.stop()


def _full_of_what_stays(admin: redis.Redis) -> None:
    """Redis all but full of keys no worker frees (another application's; on a farm, done records): 64 KiB
    under maxmemory, far less than the producers' reserve, so no job fits."""
    with admin.pipeline(transaction=False) as pipe:  # small keys: one large SET's query buffer is freed later
        for i in range(2048):
            pipe.set(f"another-app:{i}", b"x" * 1024)
        pipe.execute()
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 64 * 1024)


def test_wait_for_room_stops_when_nothing_queued_or_running_could_free_room(tmp_path: Path) -> None:
    """Room taken by what stays (here another client's keys; on a farm, done records): nothing queued or
    running would free it, so a submit that waits for room stops at once with one line that says so, where
    it used to wait for ever, and queues nothing."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    try:
        _full_of_what_stays(admin)
        env = _submit_env(server, tmp_path)
        args = ("submit", str(_prompts(tmp_path / "prompts.txt", 50)), "--dataset", "idle", "--wait-for-room")
        stopped = run_fluxfarm(*args, env=env, timeout=120)
        assert stopped.returncode != 0 and "Traceback" not in stopped.stderr, stopped.stderr
        [line] = [line for line in stopped.stderr.splitlines() if "Redis is full" in line]
        assert "waiting cannot help" in line and "raise maxmemory" in line, line
        assert DatasetBook(admin).record("idle").queued == 0
        assert waiting_messages(admin, [QUEUE_ANY]) == [0]
    finally:
        server.stop()


def test_the_gateway_says_whether_waiting_for_room_can_help(s3_server: S3Server, tmp_path: Path) -> None:
    """Through the gateway: 507 `farm_full_idle` (no Retry-After) while nothing queued or running could free
    room, and the CLI's --wait-for-room stops on it; 503 `farm_full` with Retry-After once a queued job could."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    settings = farm_settings(server, s3_server, tmp_path)
    size = {"width": 256, "height": 256, "steps": 2}
    try:
        with running_gateway(settings, tmp_path / "gateway.log") as gateway:
            token = gateway.token("carol", "--datasets", "carol-*")
            _full_of_what_stays(admin)
            with gateway.client(token) as http:
                idle = http.post("/v1/jobs", json={"prompt": "a heron", "dataset": "carol-full", **size})
                assert idle.status_code == 507, idle.text
                assert idle.json()["error"]["code"] == "farm_full_idle" and "retry-after" not in idle.headers
                env = {"FLUXFARM_API_URL": gateway.url, "FLUXFARM_API_TOKEN": token}
                args = ("submit", str(_prompts(tmp_path / "prompts.txt", 5)), "--dataset", "carol-cli")
                stopped = run_fluxfarm(*args, "--wait-for-room", env=env, timeout=120)
                assert stopped.returncode != 0 and "waiting cannot help" in stopped.stderr, stopped.stderr
                admin.config_set("maxmemory", 0)
                queued = http.post("/v1/jobs", json={"prompt": "a stork", "dataset": "carol-full", **size})
                assert queued.status_code == 202, queued.text  # a job waits now: a worker's taking it frees room
                admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 64 * 1024)
                full = http.post("/v1/jobs", json={"prompt": "an ibis", "dataset": "carol-full", **size})
                assert full.status_code == 503, full.text
                assert full.json()["error"]["code"] == "farm_full" and full.headers["retry-after"] == "60"
    finally:
        server.stop()


def test_the_exporter_and_status_show_redis_memory_and_the_bytes_a_queued_job_takes(tmp_path: Path) -> None:
    """Issue 30, point 4: operators see it coming. The exporter's bytes per queued job (sampled with
    MEMORY USAGE) agrees with what the queued jobs really added to used_memory."""
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    exporter = None
    try:
        limit = int(admin.info("memory")["used_memory"]) + 64 * 1024 * 1024
        admin.config_set("maxmemory", limit)
        env = _submit_env(server, tmp_path)
        rows = 2000
        before = int(admin.info("memory")["used_memory"])
        done = run_fluxfarm("submit", str(_prompts(tmp_path / "prompts.txt", rows)), "--dataset", "seen", env=env)
        assert done.returncode == 0, done.stderr
        added_per_job = (int(admin.info("memory")["used_memory"]) - before) / rows
        port = free_port()
        exporter = start_exporter(port, {**env, "FLUXFARM_REDIS_RESERVE_SHARE": "0.1"})
        families = scrape(port)
        used = value(families["fluxfarm_redis_used_memory_bytes"], "fluxfarm_redis_used_memory_bytes")
        assert value(families["fluxfarm_redis_maxmemory_bytes"], "fluxfarm_redis_maxmemory_bytes") == limit
        assert before < used < limit
        per_job = value(families["fluxfarm_redis_bytes_per_queued_job"], "fluxfarm_redis_bytes_per_queued_job")
        assert 0.6 * added_per_job < per_job < 1.4 * added_per_job, (per_job, added_per_job)
        status = run_fluxfarm("status", env={**env, "COLUMNS": "240"})
        assert status.returncode == 0, status.stderr
        [line] = [line for line in status.stdout.splitlines() if line.startswith("Redis:")]
        assert "MiB maxmemory" in line and "bytes a queued job" in line and "more jobs" in line, line
        report = json.loads(run_fluxfarm("status", "--json", env=env).stdout)["redis_memory"]
        fits = (limit * 0.9 - report["used_bytes"]) / report[
            "bytes_per_job"
        ]  # a read of its own: clients' buffers move
        said = re.search(r"room for ~([\d,]+) more jobs", line)
        assert said is not None and abs(int(said[1].replace(",", "")) - fits) < 0.01 * fits, (line, fits)
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(timeout=30)
        server.stop()


def test_an_unlimited_redis_has_no_limit_series_and_status_says_to_set_one(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        env = _submit_env(server, tmp_path)
        port = free_port()
        exporter = start_exporter(port, env)
        try:
            families = scrape(port)
        finally:
            exporter.terminate()
            exporter.wait(timeout=30)
        assert value(families["fluxfarm_redis_used_memory_bytes"], "fluxfarm_redis_used_memory_bytes") > 0
        assert "fluxfarm_redis_maxmemory_bytes" not in families
        assert "fluxfarm_redis_bytes_per_queued_job" not in families, "nothing queued to measure"
        status = run_fluxfarm("status", env={**env, "COLUMNS": "240"})
        assert "no maxmemory: set one" in status.stdout, status.stdout
    finally:
        server.stop()
