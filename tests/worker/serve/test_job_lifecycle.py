"""A job's life through the job runner and its retry policy, row by row (issue 31, point 5): in process,
on a real Redis, a LocalStore and the tiny model's real engine, as dramatiq tests its worker against a
stub broker. Each row says what the runner raises or returns, what the dataset record then holds, and
whether the delayed-retry set or the dead letters hold the job."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import task_id
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import InvalidJob, JobCancelled, JobDeadLettered
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.local_store import LocalStore
from fluxfarm.shared.metadata import RenderResult, WorkerInfo
from fluxfarm.shared.redis_conn import redis_now
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.job_runner import JobRunner
from fluxfarm.worker.serve.leases import JobClaims
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.serve.result_store import ResultStore
from fluxfarm.worker.serve.retry_policy import RetryPolicy, RetryScheduled
from fluxfarm.worker.settings import WorkerSettings

MAX_ATTEMPTS = 3
BACKOFF_S = 4.0
WORKER = WorkerInfo(node="w-table", hostname="here", device="cpu", gpu_name=None, vram_gib=None)
JOB = {"width": 256, "height": 256, "steps": 1, "dataset": "table"}


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> RenderEngine:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    settings = WorkerSettings(
        broker_url="redis://127.0.0.1:1/0",
        storage_url="file:///unused",
        cache_dir=tmp_path_factory.mktemp("cache"),
        inject_faults='{"poison_prompt": "POISON"}',
    )
    transformer = str(gguf_path(tiny_model, QuantLevel.Q8_0))
    return EngineLoader(settings, str(tiny_model), transformer, "cpu", WORKER, WorkerMetrics()).load()[0]


@dataclass
class Farm:
    runner: JobRunner
    book: DatasetBook
    client: redis.Redis

    def queue(self, prompt: str, **fields: object) -> RenderJob:
        """A job as a producer leaves it: validated and noted queued in its dataset's record."""
        job = parse_job({"prompt": prompt, **JOB, **fields})
        self.book.note_queued(job.dataset, [SentJob.of(job, 3, "2026-12-04T00:00:00+00:00", keep_result=False)])
        return job

    def run(self, job: RenderJob) -> RenderResult:
        """The job's message, as a task thread hands it to the runner."""
        return self.runner.run(job.model_dump(mode="json"))


@pytest.fixture
def farm(engine: RenderEngine, redis_server: RedisServer, tmp_path: Path) -> Iterator[Farm]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    book = DatasetBook(client)
    batcher = RenderBatcher(engine, 1, 0.0)
    retries = RetryPolicy(client, book, WORKER.node, MAX_ATTEMPTS, BACKOFF_S, 60.0)
    runner = JobRunner(
        batcher,
        ResultStore(LocalStore(tmp_path / "out"), 1.0),
        book,
        JobClaims(client, WORKER.node, 30.0),
        retries,
        WORKER,
        0.0,
        WorkerMetrics(),
    )
    yield Farm(runner, book, client)
    batcher.close()


def _due_in(farm: Farm, dataset: str, job_id: str) -> float | None:
    due = farm.client.zscore(keys.RETRIES_DUE, task_id(dataset, job_id))
    return None if due is None else due - redis_now(farm.client)


def test_a_good_job_is_rendered_stored_and_recorded_done_after_one_attempt(farm: Farm) -> None:
    job = farm.queue("a lighthouse")
    result = farm.run(job)
    record = farm.book.record("table")
    assert (record.done, record.queued, record.running) == (1, 0, 0)
    assert farm.book.attempts("table", result.job_id) == 0, "a done job keeps no attempt count"
    assert farm.runner.stats.images_rendered == 1


def test_a_stored_result_short_circuits_the_render(farm: Farm) -> None:
    job = farm.queue("a lighthouse at dusk")
    first = farm.run(job)
    again = farm.run(job)  # a redelivery, or a resubmit
    assert again == first and farm.runner.stats.images_rendered == 1 and farm.runner.stats.jobs_done == 2


def test_a_transient_failure_is_counted_and_backs_off_in_the_delayed_retry_set(farm: Farm) -> None:
    job = farm.queue("a POISON lighthouse")
    with pytest.raises(RetryScheduled, match="InjectedFault"):
        farm.run(job)
    job_id = job.id
    due_in = _due_in(farm, "table", job_id)
    assert due_in is not None and 0 < due_in <= BACKOFF_S
    assert farm.book.attempts("table", job_id) == 1
    assert "InjectedFault" in (farm.book.last_error("table", job_id) or "")
    record = farm.book.record("table")
    assert (record.queued, record.running, record.failed) == (1, 0, 0), "queued again, not failed"
    with pytest.raises(RetryScheduled):
        farm.run(job)
    second = _due_in(farm, "table", job_id)
    assert second is not None and BACKOFF_S < second <= 2 * BACKOFF_S, "the back-off doubles"


def test_the_last_attempt_s_failure_dead_letters_the_job(farm: Farm) -> None:
    job = farm.queue("a POISON harbour")
    for _ in range(MAX_ATTEMPTS - 1):
        with pytest.raises(RetryScheduled):
            farm.run(job)
    with pytest.raises(JobDeadLettered, match=f"{MAX_ATTEMPTS} attempts failed"):
        farm.run(job)
    (letter,) = farm.book.dead_letters(dataset="table")
    assert (letter.job_id, letter.attempts, letter.node) == (job.id, MAX_ATTEMPTS, WORKER.node)
    assert farm.book.record("table").failed == 1
    assert _due_in(farm, "table", job.id) is None


def test_attempts_spent_by_dead_workers_dead_letter_the_job_without_a_render(farm: Farm) -> None:
    """A job that killed its worker each time: attempts are counted as renders begin, so they are spent."""
    job = farm.queue("a lighthouse in a gale")
    for _ in range(MAX_ATTEMPTS):
        farm.book.start_attempt("table", job.id)
    with pytest.raises(JobDeadLettered, match="its worker died during each of its last attempts"):
        farm.run(job)
    assert farm.runner.stats.images_rendered == 0


def test_an_input_error_dead_letters_at_the_first_attempt(farm: Farm, tmp_path: Path) -> None:
    missing = tmp_path / "gone.safetensors"
    job = farm.queue("a lighthouse with a LoRA", loras=[{"source": str(missing)}])
    with pytest.raises(JobDeadLettered, match="the job's input cannot be used"):
        farm.run(job)
    assert farm.book.attempts("table", job.id) == 1 and _due_in(farm, "table", job.id) is None


def test_a_cancelled_dataset_s_job_is_dropped_unrendered(farm: Farm) -> None:
    job = farm.queue("a cancelled lighthouse")
    farm.book.cancel("table")
    with pytest.raises(JobCancelled):
        farm.run(job)
    assert farm.runner.stats.images_rendered == 0


def test_a_job_for_another_level_is_refused(farm: Farm) -> None:
    job = farm.queue("a bf16 lighthouse", quant="exact:bf16")
    with pytest.raises(InvalidJob, match="needs exact:bf16"):
        farm.run(job)
