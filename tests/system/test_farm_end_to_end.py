"""The whole path: FarmClient -> Redis -> Celery worker process (tiny FLUX, GGUF Q8_0) -> S3 over HTTP."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.job_handles import JobHandle
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import RENDER_TASK
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.metadata import RenderResult
from tests.conftest import Farm, via

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 240

REQUIRED_METADATA = {
    "job_id": None,
    "job": {"prompt", "prompt_2", "seed", "width", "height", "steps", "guidance", "max_sequence_length", "dataset"},
    "model": {"id", "transformer_sha256"},
    "quant": None,
    "worker": {"hostname", "device", "gpu_name", "vram_gib"},
    "timings": {"queued_at", "started_at", "finished_at", "load_s", "encode_s", "denoise_s", "decode_s", "upload_s"},
    "image": {"key", "sha256", "bytes", "width", "height"},
    "fluxfarm_version": None,
}


def _stored_metadata(farm: Farm, key: str) -> dict:
    return json.loads(farm.s3.client().get_object(Bucket=farm.bucket, Key=key)["Body"].read())


def test_three_jobs_land_in_s3_as_png_and_full_metadata(farm: Farm, client_settings: ProducerSettings) -> None:
    three = f"three-{via(client_settings)}"  # each transport its own dataset
    sizes = [(256, 256), (320, 256), (256, 384)]
    jobs = [
        {"prompt": f"a lighthouse number {i}", "width": w, "height": h, "steps": 2, "seed": i, "dataset": three}
        for i, (w, h) in enumerate(sizes)
    ]
    with FarmClient(client_settings) as client:
        handles = list(client.submit_many(jobs))
        results = [handle.result(timeout=RESULT_TIMEOUT_S) for handle in handles]

    keys = farm.s3.keys(farm.bucket, f"{farm.prefix}/{three}/")
    assert len(keys) == 6
    for result, (width, height) in zip(results, sizes, strict=True):
        assert f"{farm.prefix}/{three}/{result.job_id}.png" in keys
        assert f"{farm.prefix}/{three}/{result.job_id}.json" in keys
        png = farm.s3.client().get_object(Bucket=farm.bucket, Key=result.image.key)
        image = Image.open(io.BytesIO(png["Body"].read()))
        assert (image.format, image.size) == ("PNG", (width, height))
        assert png["ContentType"] == "image/png"
        assert png["Metadata"]["job-id"] == result.job_id
        assert png["Metadata"]["quant"] == "Q8_0"
        assert png["Metadata"]["transformer-sha256"] == result.model.transformer_sha256

        stored = _stored_metadata(farm, result.metadata_key)
        for field, children in REQUIRED_METADATA.items():
            assert field in stored, field
            if children:
                assert children <= set(stored[field]), (field, children - set(stored[field]))
        assert RenderResult.model_validate(stored) == result
        assert stored["quant"] == "Q8_0"
        assert stored["image"]["width"] == width and stored["image"]["height"] == height
        assert stored["image"]["bytes"] == png["ContentLength"]
        assert len(stored["model"]["transformer_sha256"]) == 64
        assert stored["worker"]["device"] == "cpu"
        timings = result.timings
        assert timings.queued_at is not None
        assert timings.queued_at <= timings.started_at <= timings.finished_at
        assert min(timings.encode_s, timings.denoise_s, timings.decode_s) > 0


def test_jobs_submitted_together_are_rendered_together_and_each_is_stored(
    farm: Farm, client_settings: ProducerSettings
) -> None:
    together = f"together-{via(client_settings)}"  # each transport its own dataset
    jobs = [
        {"prompt": f"a heron {i}", "width": 256, "height": 256, "steps": 2, "seed": i, "dataset": together}
        for i in range(4)
    ]
    with FarmClient(client_settings) as client:
        results = [handle.result(timeout=RESULT_TIMEOUT_S) for handle in client.submit_many(jobs)]
    assert max(r.timings.batch_size for r in results) > 1  # the worker held several and batched them
    assert len({r.image.sha256 for r in results}) == 4
    assert len(farm.s3.keys(farm.bucket, f"{farm.prefix}/{together}/")) == 8


def test_the_worker_loads_the_model_once(farm: Farm) -> None:
    jobs = [
        {"prompt": f"an owl {i}", "width": 256, "height": 256, "steps": 1, "dataset": "load-once"} for i in range(3)
    ]
    with FarmClient(farm.settings) as client:
        for handle in client.submit_many(jobs):
            handle.result(timeout=RESULT_TIMEOUT_S)

    stored = [_stored_metadata(farm, key) for key in farm.s3.keys(farm.bucket) if key.endswith(".json")]
    assert len(stored) >= 3
    stored.sort(key=lambda meta: meta["timings"]["started_at"])
    load_times = [meta["timings"]["load_s"] for meta in stored]
    assert load_times[0] > 0, "the first job a worker renders carries the model load time"
    assert all(value == 0 for value in load_times[1:]), load_times
    log = farm.worker.log_text()
    assert log.count("model loaded in") == 1
    host = re.search(r"host memory ([0-9.]+) GiB resident \(([0-9.]+) GiB its own, .*\), ([0-9.]+) GiB at its peak "
                     r"\(.*\), its own at most ([0-9.]+) GiB while loading", log)  # fmt: skip
    assert host is not None and 0 < float(host[2]) <= float(host[1]) <= float(host[3]), log[:2000]
    assert 0 < float(host[4]) <= float(host[3]), log[:2000]
    # where its time to the first image went, read from its log: before the first line, then the load's phases
    started = re.search(r"; ([0-9.]+)s after the process started \(device probe ([0-9.]+)s\)", log)
    assert started is not None and 0 < float(started[1]) < 300, log[:2000]
    phases = re.search(r"load phases: transformer ([0-9.]+)s, other components ([0-9.]+)s, placed with fast paths "
                       r"([0-9.]+)s\n", log)  # fmt: skip
    assert phases is not None and "weight digests ready" in log, log[:3000]
    # on a CPU nothing compiles and no step graphs are installed (CUDA only): the line says so
    first_batch = re.search(r"first batch: compiling ([0-9.]+)s \(tracing ([0-9.]+)s\), no step graphs", log)
    assert first_batch is not None and log.count("first batch:") == 1, log[-3000:]


def test_the_same_job_twice_is_rendered_once_and_returns_the_stored_result(
    farm: Farm, client_settings: ProducerSettings
) -> None:
    twice = f"twice-{via(client_settings)}"  # each transport its own dataset
    job = {"prompt": "a paper dragon over a desert", "width": 256, "height": 256, "steps": 2, "dataset": twice}
    with FarmClient(client_settings) as client:
        first = client.submit(job)
        first_result = first.result(timeout=RESULT_TIMEOUT_S)
        second = client.submit(dict(job))

    assert second.job_id == first.job_id
    assert second.cached and not first.cached
    assert second.result() == first_result
    assert farm.s3.keys(farm.bucket, f"{farm.prefix}/{twice}/") == [
        f"{farm.prefix}/{twice}/{first.job_id}.json",
        f"{farm.prefix}/{twice}/{first.job_id}.png",
    ]
    assert farm.worker.log_text().count(f"rendered job {first.job_id}") == 1


def test_a_redelivered_job_is_not_rendered_again_by_the_worker(farm: Farm) -> None:
    """The queue may deliver a job twice; the worker finds the stored result instead of rendering."""
    job = {"prompt": "a quiet harbor", "width": 256, "height": 256, "steps": 1, "dataset": "redelivered"}
    with FarmClient(farm.settings) as client:
        first = client.submit(job).result(timeout=RESULT_TIMEOUT_S)
        # Bypass the client's storage check, as a redelivery would.
        again = client._app.send_task(RENDER_TASK, kwargs={"job": first.job.model_dump(mode="json")})
        replay = JobHandle(first.job, async_result=again, stored=None).result(timeout=RESULT_TIMEOUT_S)

    assert replay == first
    assert farm.worker.log_text().count(f"rendered job {first.job_id}") == 1
    assert f"job {first.job_id} is already stored" in farm.worker.log_text()


def test_the_worker_validates_jobs_again_and_the_caller_gets_the_reason(farm: Farm) -> None:
    """The queue is not trusted: a message that skipped the client's validation is refused, not rendered."""
    bad = {"prompt": "sneaky", "width": 100, "height": 256, "steps": 1, "dataset": "../../escape"}
    with FarmClient(farm.settings) as client:
        sent = client._app.send_task(RENDER_TASK, kwargs={"job": bad})
        handle = JobHandle(parse_job({"prompt": "sneaky"}), async_result=sent, stored=None)
        with pytest.raises(JobFailed, match=r"InvalidJob: .*width.*dataset"):
            handle.result(timeout=RESULT_TIMEOUT_S)
    assert not [key for key in farm.s3.keys(farm.bucket) if "escape" in key or "sneaky" in key]


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof of whether a worker ever deserialized a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickled_task_message_is_refused_unread_and_the_worker_goes_on(farm: Farm, tmp_path: Path) -> None:
    """JSON is the only accepted content: a pickle payload on the queue is rejected before it is decoded."""
    from fluxfarm.shared.celery_app import QUEUE_ANY, make_celery_app, waiting_messages

    marker = tmp_path / "unpickled"
    app = make_celery_app(farm.settings)
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        producer.publish(
            ((), {"job": _TouchOnUnpickle(str(marker))}, {}),
            exchange="",
            routing_key=QUEUE_ANY,
            serializer="pickle",
            headers={"lang": "py", "task": RENDER_TASK, "id": "pickled-1", "argsrepr": "()", "kwargsrepr": "{}"},
        )
    app.close()
    broker = redis.Redis.from_url(farm.settings.broker_url)
    deadline = time.monotonic() + 60
    while waiting_messages(broker, [QUEUE_ANY]) != [0]:  # the worker took it off the queue ...
        assert time.monotonic() < deadline
        time.sleep(0.2)
    job = {"prompt": "after the pickle", "width": 256, "height": 256, "steps": 1, "dataset": "after-pickle"}
    with FarmClient(farm.settings) as client:
        assert client.submit(job).result(timeout=RESULT_TIMEOUT_S).job.prompt == "after the pickle"
    assert not marker.exists()  # ... and never unpickled it
    assert "pickle" in farm.worker.log_text().lower()  # it says why it refused the message
