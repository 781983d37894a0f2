"""A job id names one job of its dataset: no submitter can pre-fill, take over or read another's result
through a job id (issue 18, finding 3).

Through a real worker process: a named job's id cannot be reused for another prompt (at the client, in a
stream, and past the client straight onto the queue), a content id cannot be claimed by other parameters,
and two datasets that use the same name get their own results.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from celery import states

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import PRIORITY_STEPS, RENDER_TASK, send_render, task_id
from fluxfarm.shared.errors import InvalidJob, JobConflict
from fluxfarm.shared.jobs import RenderJob, parse_job
from tests.conftest import Farm

TINY = {"width": 256, "height": 256, "steps": 2}
TIMEOUT_S = 240


def _job(**fields: object) -> RenderJob:
    return parse_job({**TINY, **fields})


def test_a_named_job_cannot_be_taken_over(farm: Farm) -> None:
    alice = _job(prompt="alice's own prompt", dataset="alice", job_id="img-0001")
    mallory = _job(prompt="mallory's prompt", dataset="alice", job_id="img-0001")
    with FarmClient(farm.settings) as client:
        assert client.submit(alice).result(timeout=TIMEOUT_S).job.prompt == "alice's own prompt"
        with pytest.raises(JobConflict, match="img-0001 already names another job"):
            client.submit(mallory)
        with pytest.raises(JobConflict):
            client.submit_stream([mallory])
        # The same job again is still "already stored", and keeps Alice's prompt.
        again = client.submit(alice)
        assert again.cached and again.result().job.prompt == "alice's own prompt"

        # Past the client, straight onto the queue: the worker refuses it and the stored result stays Alice's.
        sent = client._app.AsyncResult(task_id("alice", "img-0001"))
        sent.forget()  # Alice's own task result, so the one read below is the copy's
        send_render(client._app, mallory, mallory.queue, PRIORITY_STEPS["high"], "", keep_result=True)
        sent.get(timeout=TIMEOUT_S, propagate=False)
        assert sent.state == states.FAILURE and "already names another job" in str(sent.result)
        assert client.stored_result(alice) is not None
        assert client.stored_result(alice).job.prompt == "alice's own prompt"  # type: ignore[union-attr]
        assert client.datasets.record("alice").failed == 0, "Alice's record does not learn of the refused copy"


def test_a_content_id_names_only_its_own_parameters(farm: Farm) -> None:
    alice = _job(prompt="alice's future job", dataset="alice-2", seed=5)
    stolen = {**TINY, "prompt": "another prompt", "dataset": "alice-2", "seed": 5, "job_id": alice.id}
    with FarmClient(farm.settings) as client:
        with pytest.raises(InvalidJob, match="shape of a content id"):
            client.submit(stolen)
        # Sent past the client: the worker validates the job again and refuses it.
        raw = client._app.send_task(
            RENDER_TASK, kwargs={"job": stolen}, task_id=task_id("alice-2", alice.id), queue=alice.queue
        )
        raw.get(timeout=TIMEOUT_S, propagate=False)
        assert raw.state == states.FAILURE and "content id" in str(raw.result)
        raw.forget()
        assert client.submit(alice).result(timeout=TIMEOUT_S).job.prompt == "alice's future job"
    # The job's own content id, given explicitly, is still the job itself.
    assert _job(prompt="alice's future job", dataset="alice-2", seed=5, job_id=alice.id) == alice


def test_datasets_sharing_a_name_keep_their_own_results(client_settings: ProducerSettings) -> None:
    secret = _job(prompt="mallory's private prompt", dataset="mallory", job_id="shared-name")
    mine = _job(prompt="bob's prompt", dataset="bob", job_id="shared-name")
    with FarmClient(client_settings) as client:
        assert client.submit(secret).result(timeout=TIMEOUT_S).job.prompt == "mallory's private prompt"
        got = client.submit(mine).result(timeout=TIMEOUT_S)
    assert (got.job.dataset, got.job.prompt) == ("bob", "bob's prompt")


@pytest.fixture
def queue_only(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> ProducerSettings:
    """A farm with no worker: what is submitted stays queued."""
    redis_client.flushdb()
    return ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}")


def test_a_queued_name_is_not_taken_by_another_job(queue_only: ProducerSettings) -> None:
    first = _job(prompt="first", dataset="d", job_id="row-1")
    other = _job(prompt="other", dataset="d", job_id="row-1")
    with FarmClient(queue_only) as client:
        client.submit(first)
        with pytest.raises(JobConflict, match="queued"):
            client.submit(other)
        with pytest.raises(JobConflict, match="queued"):
            client.submit_stream([other])
        assert client.submit_stream([first]).already_waiting == 1
        with pytest.raises(JobConflict, match="earlier in this stream"):
            client.submit_stream([_job(prompt="x", dataset="e", job_id="n"), _job(prompt="y", dataset="e", job_id="n")])
        sent = client.datasets.sent_job("d", "row-1")
        assert sent is not None and sent.job["prompt"] == "first"
