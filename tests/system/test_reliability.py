"""Nothing lost, nothing duplicated: workers SIGKILLed and SIGTERMed, Redis restarted, S3 stopped,
duplicate deliveries. Real redis-server, moto S3 over HTTP, worker processes, real signals."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.job_handles import JobHandle
from fluxfarm.producer.local_stack import RedisServer, free_port
from fluxfarm.shared.celery_app import RENDER_TASK, task_id
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.jobs import parse_job
from tests.conftest import S3Server, fresh_farm_settings
from tests.fault_farm import SMALL_JOB, fault_worker, renders_logged, stored_once, wait_until
from tests.host_settings import HostSettings

pytestmark = pytest.mark.faults

RESULT_TIMEOUT_S = 300
DEFAULT_LEASE_S = HostSettings().lease_s


def _jobs(dataset: str, count: int, word: str = "lantern") -> list[dict]:
    return [{"prompt": f"a {word} number {i}", "dataset": dataset, **SMALL_JOB} for i in range(count)]


def _farm_settings(redis_server: RedisServer, s3_server: S3Server, tmp_path: Path) -> tuple[HostSettings, str]:
    bucket = s3_server.new_bucket()
    return fresh_farm_settings(redis_server, s3_server, f"s3://{bucket}/renders", tmp_path), bucket


def test_a_sigkilled_worker_s_job_comes_back_within_a_minute_and_is_stored_once(
    redis_server: RedisServer, s3_server: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """Worker A starts a render longer than the lease; B, alive beside it, must not take the job while
    A lives (A renews the lease), and must take it within 60 s of A's SIGKILL (default lease)."""
    settings, bucket = _farm_settings(redis_server, s3_server, tmp_path)
    book = DatasetBook.from_url(settings.broker_url)
    a = fault_worker(settings, tiny_model, tmp_path / "a.log", "w-a", {"slow_denoise_s": 600}, max_batch="1")
    b = None
    try:
        with FarmClient(settings) as client:
            handle = client.submit({"prompt": "a lighthouse in fog", "dataset": "killed", **SMALL_JOB})
            wait_until(lambda: book.record("killed").running == 1, 60, "worker A to start the job")
            started = time.monotonic()
            b = fault_worker(settings, tiny_model, tmp_path / "b.log", "w-b")
            # A's render has now outlived one whole lease plus a sweep, with B sweeping beside it.
            time.sleep(max(0.0, started + DEFAULT_LEASE_S * 1.4 - time.monotonic()))
            assert handle.job_id not in b.log_text(), "B took a job whose worker was alive"
            assert a.process is not None
            a.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            a.process.wait()
            result = handle.result(timeout=RESULT_TIMEOUT_S)
            redelivered_after = time.monotonic() - killed
        assert redelivered_after < 60, f"redelivered {redelivered_after:.0f}s after the kill"
        assert result.worker.node == "w-b"
        stored_once(s3_server, bucket, "renders", "killed", {handle.job_id})
        assert renders_logged([a.log_text(), b.log_text()], handle.job_id) == 1
        record = book.record("killed")
        assert (record.done, record.running, record.queued, record.failed) == (1, 0, 0, 0)
        print(f"\nSIGKILL: the job was stored by B {redelivered_after:.1f}s after A was killed")
    finally:
        a.stop()
        if b is not None:
            b.stop()
        book.close()


def test_sigterm_finishes_the_jobs_in_hand_and_leaves_the_rest_queued(
    redis_server: RedisServer, s3_server: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    settings, bucket = _farm_settings(redis_server, s3_server, tmp_path)
    book = DatasetBook.from_url(settings.broker_url)
    a = fault_worker(settings, tiny_model, tmp_path / "a.log", "w-a", {"slow_denoise_s": 3}, max_batch="1")
    with FarmClient(settings) as client:
        handles = list(client.submit_many(_jobs("termed", 6)))
        wait_until(lambda: book.record("termed").running >= 1, 60, "worker A to start a job")
        assert a.process is not None
        a.process.send_signal(signal.SIGTERM)
        assert a.process.wait(timeout=120) == 0, "a warm shutdown exits cleanly"
        record = book.record("termed")
        finished_by_a = sum(renders_logged([a.log_text()], h.job_id) for h in handles)
        assert finished_by_a >= 1 and record.running == 0, "A finished what it held before it exited"
        assert record.done == finished_by_a and record.queued == 6 - finished_by_a
        b = fault_worker(settings, tiny_model, tmp_path / "b.log", "w-b")
        try:
            results = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
        finally:
            b.stop()
    stored_once(s3_server, bucket, "renders", "termed", {h.job_id for h in handles})
    assert all(renders_logged([a.log_text(), b.log_text()], r.job_id) == 1 for r in results)
    book.close()


def test_queued_jobs_survive_a_redis_restart_and_workers_and_producer_reconnect(
    s3_server: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """Redis with AOF, as docker-compose.yml runs it, restarted in the middle of a dataset."""
    redis_server = RedisServer(tmp_path / "redis", appendonly=True).start()
    settings, bucket = _farm_settings(redis_server, s3_server, tmp_path)
    book = DatasetBook.from_url(settings.broker_url)
    worker = fault_worker(settings, tiny_model, tmp_path / "w.log", "w-aof", {"slow_denoise_s": 1}, max_batch="2")
    try:
        with FarmClient(settings) as client:
            first = list(client.submit_many(_jobs("restarted", 12)))
            wait_until(lambda: book.record("restarted").done >= 2, 120, "the first jobs")
            redis_server.stop()  # SIGTERM: Redis flushes its AOF and exits, as on a restart
            time.sleep(3)
            redis_server.start()
            assert book.record("restarted").total == 12, "the dataset record came back from the AOF"
            second = list(client.submit_many(_jobs("restarted", 4, word="comet")))  # the producer reconnects
            results = [h.result(timeout=RESULT_TIMEOUT_S) for h in first + second]
        ids = {r.job_id for r in results}
        assert len(ids) == 16
        stored_once(s3_server, bucket, "renders", "restarted", ids)
        record = book.record("restarted")
        assert (record.done, record.queued, record.running, record.failed) == (16, 0, 0, 0)
        # The renders in flight as Redis went away ran on (a thread cannot be cancelled): no failed cancel a job,
        # nor Celery's notice about the setting that is off for that reason.
        log = worker.log_text()
        assert "Failed to cancel active request" not in log, log[-3000:]
        assert "In Celery 5.1 we introduced" not in log, log[-3000:]
    finally:
        worker.stop()
        book.close()
        redis_server.stop()


def test_uploads_wait_out_a_30_second_s3_outage_and_leave_no_partial_objects(
    redis_server: RedisServer, tiny_model: Path, tmp_path: Path
) -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    settings, bucket = _farm_settings(redis_server, s3, tmp_path)
    broker = redis.Redis.from_url(settings.broker_url)
    book = DatasetBook(broker)
    worker = fault_worker(settings, tiny_model, tmp_path / "w.log", "w-s3", {"slow_denoise_s": 1}, max_batch="2")
    try:
        with FarmClient(settings) as client:
            handles = list(client.submit_many(_jobs("outage", 8)))
            wait_until(lambda: book.record("outage").done >= 1, 120, "the first job")
            moto.stop()
            outage_start = time.monotonic()
            wait_until(lambda: "retrying in" in worker.log_text(), 60, "the worker to retry the store")
            held = broker.hlen("unacked")
            done_during = book.record("outage").done
            time.sleep(max(0.0, outage_start + 30 - time.monotonic()))
            assert book.record("outage").done == done_during, "nothing finishes while storage is down"
            assert held >= 1, "the jobs in flight stay unacknowledged during the outage"
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
            results = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
        stored_once(s3, bucket, "renders", "outage", {r.job_id for r in results})
        assert broker.hlen("unacked") == 0
        assert worker.process is not None and worker.process.poll() is None
    finally:
        worker.stop()
        book.close()
        moto.stop()


def test_a_job_delivered_twice_to_two_workers_is_rendered_and_stored_once(
    redis_server: RedisServer, s3_server: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """A holds the job (and a filler, so its two slots are full); the duplicate can only go to B,
    which finds A's claim and waits for A's result instead of rendering."""
    settings, bucket = _farm_settings(redis_server, s3_server, tmp_path)
    book = DatasetBook.from_url(settings.broker_url)
    # Slow enough that A is still on the job when B is up and the duplicate is sent.
    a = fault_worker(settings, tiny_model, tmp_path / "a.log", "w-a", {"slow_denoise_s": 45}, max_batch="1")
    b = None
    try:
        job = parse_job({"prompt": "twin moons", "dataset": "twins", **SMALL_JOB})
        filler = parse_job({"prompt": "a filler", "dataset": "twins-filler", **SMALL_JOB})
        with FarmClient(settings) as client:
            send = client._app.send_task  # bypasses the client's own duplicate check, as a redelivery would
            first = send(RENDER_TASK, kwargs={"job": job.model_dump(mode="json")}, task_id=task_id("twins", job.id))
            send(
                RENDER_TASK, kwargs={"job": filler.model_dump(mode="json")}, task_id=task_id("twins-filler", filler.id)
            )
            wait_until(lambda: a.log_text().count("Task fluxfarm.render[") >= 2, 60, "A to hold both jobs")
            b = fault_worker(settings, tiny_model, tmp_path / "b.log", "w-b")
            second = send(RENDER_TASK, kwargs={"job": job.model_dump(mode="json")})
            one = JobHandle(job, async_result=first, stored=None).result(RESULT_TIMEOUT_S)
            two = JobHandle(job, async_result=second, stored=None).result(RESULT_TIMEOUT_S)
        assert one == two
        assert f"job {job.id} is being rendered by w-a/" in b.log_text()
        assert renders_logged([a.log_text(), b.log_text()], job.id) == 1
        stored_once(s3_server, bucket, "renders", "twins", {job.id})
    finally:
        a.stop(signal.SIGKILL)  # the filler is not this test's business
        if b is not None:
            b.stop()
        book.close()


def test_a_job_whose_message_was_lost_in_delivery_is_sent_again(
    redis_server: RedisServer, s3_server: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    """kombu pops a message before it records it as unacknowledged: a worker killed in between loses
    it. Here the message of one of three queued jobs is taken off the queue by hand, as that pop would;
    the workers' lost-job sweep must find the job queued with no message anywhere and send it again."""
    from fluxfarm.shared.celery_app import QUEUE_ANY, queue_lists

    settings, bucket = _farm_settings(redis_server, s3_server, tmp_path)
    broker = redis.Redis.from_url(settings.broker_url)
    with FarmClient(settings) as client:
        handles = list(client.submit_many(_jobs("lost", 3)))
        (lost_list,) = [name for name in queue_lists(QUEUE_ANY) if broker.llen(name)]
        assert broker.rpop(lost_list) is not None  # the next message a worker would have taken
        worker = fault_worker(settings, tiny_model, tmp_path / "w.log", "w-sweeper", lease_s="5")
        try:
            results = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
        finally:
            worker.stop()
    stored_once(s3_server, bucket, "renders", "lost", {r.job_id for r in results})
    log = worker.log_text()
    assert log.count("(lost in delivery); sent again") == 1
    assert all(renders_logged([log], r.job_id) == 1 for r in results)
    broker.close()
