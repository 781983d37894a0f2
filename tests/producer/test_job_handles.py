"""A handle reports the outcome its own submission got: an earlier submission's failure, forgotten by the
resubmit but still on its way through Celery's result consumer, is not this one's (a resubmit right after a
refusal once reported the refusal again: `test_a_content_id_names_only_its_own_parameters`, under load).

Real Redis, a real Celery app and its result consumer; no worker: the outcomes are written as a worker's
result backend writes them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.errors import InvalidJob, JobFailed
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.metadata import RenderResult

WAIT_S = 6.0


def _failure(client: FarmClient, task: str, message: str) -> tuple[bytes, bytes]:
    """The result key and value a worker writes (and publishes) for a task refused with `message`."""
    backend = client._app.backend
    meta = backend._get_result_meta(
        result=backend.prepare_exception(InvalidJob(message)), state="FAILURE", traceback=None, request=None
    )
    return backend.get_key_for_task(task), backend.encode({**meta, "task_id": task})


def test_a_forgotten_failure_still_in_flight_is_not_the_resubmit_s_outcome(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.flushdb()
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}")
    job = parse_job({"prompt": "a heron", "width": 256, "height": 256, "steps": 2, "dataset": "herons"})
    with FarmClient(settings) as client:
        handle = client.submit(job)
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                handle.result(timeout=WAIT_S)
            except BaseException as error:  # the waiting thread reports whatever ended it
                outcome.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        key, value = _failure(client, handle.task_id, "an earlier submission's refusal")
        deadline = time.monotonic() + WAIT_S
        while redis_client.pubsub_numsub(key)[0][1] == 0:  # the handle listens on its task's channel
            assert time.monotonic() < deadline, "the handle never subscribed to its result"
            time.sleep(0.02)
        # Published while the handle listens, but no longer held: what the consumer may still deliver after
        # a resubmit forgot the failure. Set, publish and delete in one transaction, so no read sees it held.
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.set(key, value).publish(key, value).delete(key).execute()
        waiter.join(WAIT_S + 30)
        assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome

        # A failure the backend holds is this submission's: reported at once, with its reason.
        key, value = _failure(client, handle.task_id, "this submission's refusal")
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.set(key, value).publish(key, value).execute()
        with pytest.raises(JobFailed, match="this submission's refusal"):
            handle.result(timeout=WAIT_S)


def test_a_failure_the_backend_holds_for_a_job_stored_after_all_is_not_reported(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Storage is the truth: a worker that stored the image but could not write its success (a full or
    restarting Redis) may still have written a failure; the handle returns the stored result."""
    redis_client.flushdb()
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}")
    job = parse_job({"prompt": "a stork", "width": 256, "height": 256, "steps": 2, "dataset": "storks"})
    sample = next((Path(__file__).parents[1] / "fixtures" / "results-0.1.0").rglob("*.json"))
    stored = RenderResult.model_validate(
        {**json.loads(sample.read_text()), "job_id": job.id, "job": job.model_dump(mode="json")}
    )
    with FarmClient(settings) as client:
        handle = client.submit(job)
        key, value = _failure(client, handle.task_id, "its success could not be written")
        redis_client.set(key, value)
        keys = client.store.result_keys(job.dataset, job.id)
        client.store.put(keys.metadata, stored.model_dump_json().encode(), "application/json")
        assert handle.result(timeout=WAIT_S) == stored
