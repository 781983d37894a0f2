"""A worker on a password-protected Redis with fault drills: poison jobs, GPU out of memory, and no
secret anywhere a person or a program can read it afterwards."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import S3Server, fresh_farm_settings, run_fluxfarm
from tests.fault_farm import SMALL_JOB, fault_worker, stored_once
from tests.host_settings import HostSettings

pytestmark = pytest.mark.faults

RESULT_TIMEOUT_S = 300
REDIS_PASSWORD = "redis-pw-7c1e9f"
FAULTS = {"poison_prompt": "POISON", "oom_batch_over": 1, "oom_pixels_over": 256 * 256}
WIDE = {"width": 512, "height": 512, "steps": 2}


@dataclass(frozen=True)
class DrillFarm:
    settings: HostSettings
    bucket: str
    s3: S3Server
    worker: WorkerProcess
    outputs: list[str]
    """Everything the CLI printed in these tests, for the secrets check."""

    def env(self) -> dict[str, str]:
        return {
            "FLUXFARM_BROKER_URL": self.settings.broker_url,
            "FLUXFARM_STORAGE_URL": self.settings.storage_url,
            "FLUXFARM_S3_ENDPOINT_URL": self.settings.s3_endpoint_url or "",
            "COLUMNS": "220",
        }

    def fluxfarm(self, *args: str, stdout_only: bool = False) -> str:
        """Run the CLI against this farm; its output is kept for the secrets check."""
        done = run_fluxfarm(*args, env=self.env())
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        return done.stdout if stdout_only else done.stdout + done.stderr


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, s3_server: S3Server) -> Iterator[DrillFarm]:
    work = tmp_path_factory.mktemp("drill")
    with RedisServer(work / "redis", password=REDIS_PASSWORD) as redis_server:
        bucket = s3_server.new_bucket()
        settings = fresh_farm_settings(redis_server, s3_server, f"s3://{bucket}/renders", work)
        worker = fault_worker(settings, tiny_model, work / "worker.log", "w-drill", FAULTS, max_attempts="2")
        yield DrillFarm(settings, bucket, s3_server, worker, [])
        worker.stop()


def test_a_poison_job_is_dead_lettered_after_its_attempts_and_the_others_flow(drill: DrillFarm) -> None:
    jobs = [{"prompt": f"a calm sea {i}", "dataset": "poisoned", **SMALL_JOB} for i in range(3)]
    jobs.insert(1, {"prompt": "a POISON apple", "dataset": "poisoned", **SMALL_JOB})
    with FarmClient(drill.settings) as client:
        handles = list(client.submit_many(jobs))
        good = [handles[i].result(timeout=RESULT_TIMEOUT_S) for i in (0, 2, 3)]
        with pytest.raises(JobFailed, match=r"dead-lettered: 2 attempts failed, the last: InjectedFault"):
            handles[1].result(timeout=RESULT_TIMEOUT_S)
    poison_id = handles[1].job_id
    stored_once(drill.s3, drill.bucket, "renders", "poisoned", {r.job_id for r in good})
    book = DatasetBook.from_url(drill.settings.broker_url)
    record = book.record("poisoned")
    assert (record.done, record.failed, record.queued, record.running) == (3, 1, 0, 0)
    (letter,) = book.dead_letters(dataset="poisoned")
    book.close()
    assert (letter.job_id, letter.attempts, letter.node) == (poison_id, 2, "w-drill")
    assert letter.job["prompt"] == "a POISON apple"
    log = drill.worker.log_text()
    assert f"job {poison_id} attempt 1/2 failed" in log and f"job {poison_id} dead-lettered" in log

    shown = drill.fluxfarm("status", "--dataset", "poisoned")
    assert "dead letters" in shown and poison_id in shown and "InjectedFault" in shown
    status = json.loads(drill.fluxfarm("status", "--dataset", "poisoned", "--json", stdout_only=True))
    assert [(d["job_id"], d["attempts"]) for d in status["dead_letters"]] == [(poison_id, 2)]


def test_out_of_memory_splits_the_batch_then_fails_a_job_too_big_alone_and_the_worker_goes_on(
    drill: DrillFarm,
) -> None:
    together = [{"prompt": f"a pine forest {i}", "dataset": "oom", **SMALL_JOB} for i in range(4)]
    with FarmClient(drill.settings) as client:
        results = [h.result(timeout=RESULT_TIMEOUT_S) for h in client.submit_many(together)]
        assert all(r.timings.batch_size == 1 for r in results)
        big = client.submit({"prompt": "a wide valley", "dataset": "oom", **WIDE})
        with pytest.raises(JobFailed, match="GPU out of memory rendering this job alone at level Q8_0"):
            big.result(timeout=RESULT_TIMEOUT_S)
        small = client.submit({"prompt": "a small pond", "dataset": "oom", **SMALL_JOB})
        after = small.result(timeout=RESULT_TIMEOUT_S)
    stored_once(drill.s3, drill.bucket, "renders", "oom", {r.job_id for r in results} | {after.job_id})
    log = drill.worker.log_text()
    assert "ran out of GPU memory; batching at most" in log
    assert drill.worker.process is not None and drill.worker.process.poll() is None
    assert log.count("model loaded in") == 1, "no crash, no reload"


def test_no_secret_reaches_a_log_an_object_a_record_or_the_cli(drill: DrillFarm) -> None:
    """Runs last: every place the tests above wrote to is searched for the Redis password and the
    S3 secret key."""
    secrets = [REDIS_PASSWORD, os.environ["AWS_SECRET_ACCESS_KEY"]]
    drill.fluxfarm("status")
    drill.fluxfarm("status", "--json")
    texts = {"worker log": drill.worker.log_text(), "CLI output": "\n".join(drill.outputs)}
    s3 = drill.s3.client()
    for key in drill.s3.keys(drill.bucket):
        obj = s3.get_object(Bucket=drill.bucket, Key=key)
        texts[key] = obj["Body"].read().decode("latin-1") + json.dumps(obj["Metadata"])
    broker = redis.Redis.from_url(drill.settings.broker_url)
    for key in broker.scan_iter(count=1000):
        kind = broker.type(key).decode()
        value = {
            "string": lambda k: broker.get(k),
            "hash": lambda k: broker.hgetall(k),
            "list": lambda k: broker.lrange(k, 0, -1),
            "set": lambda k: broker.smembers(k),
            "zset": lambda k: broker.zrange(k, 0, -1),
        }[kind](key)
        texts[f"redis {key!r}"] = repr(value)
    broker.close()
    assert len(texts) > 20
    leaks = [(where, secret) for where, text in texts.items() for secret in secrets if secret in text]
    assert not leaks, leaks


def test_a_job_too_big_alone_steps_a_self_chosen_worker_down_a_level(
    tiny_model: Path, redis_server: RedisServer, s3_server: S3Server, tmp_path: Path
) -> None:
    """A worker that picked its own level (bf16, from a catalog) meets a job that does not fit at bf16
    even alone: it reloads at Q8_0, renders the job, and from then on serves Q8_0's queues, not bf16's."""
    from fluxfarm.shared.celery_app import waiting_messages
    from fluxfarm.shared.fleet import read_workers
    from fluxfarm.worker.tools.tiny_model import gguf_path
    from tests.conftest import start_worker
    from tests.fault_farm import wait_until

    catalog = tmp_path / "catalog.toml"
    levels = "\n".join(f'{level} = "{gguf_path(tiny_model, QuantLevel(level))}"' for level in ("Q8_0", "Q4_0"))
    catalog.write_text(f'[models."{tiny_model}"]\n{levels}\n')
    bucket = s3_server.new_bucket()
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{bucket}/renders", tmp_path)
    faults = {"oom_pixels_over": 256 * 256, "oom_levels": ["bf16"]}
    env = {"FLUXFARM_CATALOG": str(catalog), "FLUXFARM_INJECT_FAULTS": json.dumps(faults)}
    worker = start_worker(settings, tiny_model, None, tmp_path / "w.log", "w-stepper", env)
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        with FarmClient(settings) as client:
            small = client.submit({"prompt": "a small boat", "dataset": "steps", **SMALL_JOB})
            assert small.result(timeout=RESULT_TIMEOUT_S).quant == "bf16"
            wide = client.submit({"prompt": "a wide harbour", "dataset": "steps", **WIDE})
            assert wide.result(timeout=RESULT_TIMEOUT_S).quant == "Q8_0"
            wait_until(lambda: [w.level for w in read_workers(broker)] == ["Q8_0"], 30, "the heartbeat's new level")
            (status,) = read_workers(broker)
            assert "render.exact.q8_0" in status.queues and "render.exact.bf16" not in status.queues
            exact = client.submit({"prompt": "an exact boat", "dataset": "steps", "quant": "exact:Q8_0", **SMALL_JOB})
            assert exact.result(timeout=RESULT_TIMEOUT_S).quant == "Q8_0"  # a queue it did not serve before
            client.submit({"prompt": "a bf16 boat", "dataset": "steps", "quant": "exact:bf16", **SMALL_JOB})
            time.sleep(5)
            assert waiting_messages(broker, ["render.exact.bf16"]) == [1], "a bf16-only job waits for a bf16 worker"
        log = worker.log_text()
        assert "stepped down from bf16 to Q8_0" in log and log.count("model loaded in") == 2
    finally:
        worker.stop()
        broker.close()
