"""Jobs name their model (issue 20, point 1 and acceptance 1): a worker of tiny FLUX.1 [dev] and one of tiny
FLUX.2 [klein] on one Redis, each job rendered only by the worker of its model, and a job for a model no
live worker holds reported at once; a Kontext worker (the tiny FLUX.1 folder, loaded as
FluxKontextPipeline) edits an input image, and the metadata names the image's sha256. The klein and Kontext
workers' folders say what they are with FLUXFARM_MODEL_NAME.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from PIL import Image

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.job_handles import JobHandle
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.adapters import as_inline_png
from fluxfarm.shared.celery_app import RENDER_TASK, queue_lists
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.fleet import read_workers
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from tests.conftest import WORKER_READY_TIMEOUT_S, S3Server, farm_env, fresh_farm_settings, run_fluxfarm
from tests.host_settings import HostSettings

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 240
SMALL = {"width": 256, "height": 256, "steps": 1}


@dataclass(frozen=True)
class Fleet:
    settings: HostSettings
    env: dict[str, str]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server: RedisServer, s3_server: S3Server
) -> Iterator[Fleet]:
    from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model

    work = tmp_path_factory.mktemp("models")
    klein = write_tiny_model(work / "tiny-klein", [QuantLevel.Q8_0], model=FluxModel.FLUX_2_KLEIN_4B)
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/models", work)
    dev = ["--model", str(tiny_model), "--transformer", str(gguf_path(tiny_model, QuantLevel.Q8_0)), "--device", "cpu"]
    workers = [
        WorkerProcess(dev, {**farm_env(settings), "FLUXFARM_WORKER_NAME": "w-dev"}, work / "dev.log").start(),
        WorkerProcess(
            ["--model", str(klein), "--transformer", str(gguf_path(klein, QuantLevel.Q8_0)), "--device", "cpu"],
            {**farm_env(settings), "FLUXFARM_WORKER_NAME": "w-klein", "FLUXFARM_MODEL_NAME": "flux.2-klein-4b"},
            work / "klein.log",
        ).start(),
        WorkerProcess(
            ["--model", str(tiny_model), "--device", "cpu"],
            {**farm_env(settings), "FLUXFARM_WORKER_NAME": "w-kontext", "FLUXFARM_MODEL_NAME": "flux.1-kontext-dev"},
            work / "kontext.log",
        ).start(),
    ]
    for worker in workers:
        worker.wait_ready(WORKER_READY_TIMEOUT_S)
    yield Fleet(settings=settings, env=farm_env(settings))
    for worker in workers:
        worker.stop()


def test_each_job_renders_only_on_a_worker_of_its_model(fleet: Fleet, tmp_path: Path) -> None:
    with redis.Redis.from_url(fleet.settings.broker_url) as client:
        serving = {status.node: (status.flux_model, status.queues) for status in read_workers(client)}
    assert serving["w-dev"][0] == FluxModel.FLUX_1_DEV and "render.any" in serving["w-dev"][1]
    assert serving["w-klein"][0] == FluxModel.FLUX_2_KLEIN_4B
    assert "render.flux2-klein-4b.any" in serving["w-klein"][1] and "render.any" not in serving["w-klein"][1]

    rows = [{"prompt": f"a kite {i}", "seed": i, **({"model": "flux.2-klein-4b"} if i % 2 else {})} for i in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({**row, **SMALL}) + "\n" for row in rows))
    done = run_fluxfarm("submit", str(path), "--dataset", "mixed", "--wait", "--timeout", "240", env=fleet.env)
    assert done.returncode == 0, done.stderr
    with FarmClient(fleet.settings) as client:
        results = [client.stored_result(parse_job({**row, **SMALL, "dataset": "mixed"})) for row in rows]
    rendered = {(result.job.model, result.worker.node) for result in results if result is not None}
    assert len([result for result in results if result is not None]) == 6
    assert rendered == {(FluxModel.FLUX_1_DEV, "w-dev"), (FluxModel.FLUX_2_KLEIN_4B, "w-klein")}
    klein = next(result for result in results if result is not None and result.job.model == FluxModel.FLUX_2_KLEIN_4B)
    assert (klein.job.steps, klein.job.guidance) == (1, 1.0), "the row's steps, klein's guidance"
    assert klein.quant == "Q8_0" and klein.model.id.endswith("tiny-klein"), "klein's GGUF transformer"


def test_a_job_for_a_model_no_live_worker_holds_is_reported_at_once(fleet: Fleet) -> None:
    job = ("--prompt", "a klein kite", "--model", "flux.2-dev", "--width", "256", "--height", "256")
    submitted = run_fluxfarm("submit", *job, env=fleet.env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    assert "no live worker serves flux.2-dev at auto: 1 jobs wait in render.flux2-dev.any" in submitted.stderr
    status = run_fluxfarm("status", "--json", env=fleet.env, timeout=60)
    unserved = {queue["name"]: queue for queue in json.loads(status.stdout)["fleet"]["unserved"]}
    assert (
        unserved["render.flux2-dev.any"]["model"] == "flux.2-dev" and unserved["render.flux2-dev.any"]["waiting"] == 1
    )
    table = run_fluxfarm("status", env=fleet.env, timeout=60).stdout
    assert "flux.2-klein-4b" in table and "unserved: 1 jobs need flux.2-dev at auto" in table
    redis.Redis.from_url(fleet.settings.broker_url).delete(*queue_lists("render.flux2-dev.any"))


def test_a_producer_default_model_applies_to_jobs_that_name_none(fleet: Fleet) -> None:
    settings = ProducerSettings(
        broker_url=fleet.settings.broker_url,
        storage_url=fleet.settings.storage_url,
        s3_endpoint_url=fleet.settings.s3_endpoint_url,
        default_model=FluxModel.FLUX_2_KLEIN_4B,
    )
    with FarmClient(settings) as client:
        result = client.submit({"prompt": "a default kite", "dataset": "defaults", **SMALL}).result(RESULT_TIMEOUT_S)
    assert result.job.model == FluxModel.FLUX_2_KLEIN_4B and result.worker.node == "w-klein"


def test_a_job_sent_past_the_queues_to_a_worker_of_another_model_fails_with_the_reason(fleet: Fleet) -> None:
    job = parse_job({"prompt": "misrouted", "model": "flux.2-klein-4b", "dataset": "misrouted", **SMALL})
    with FarmClient(fleet.settings) as client:
        sent = client._app.send_task(RENDER_TASK, kwargs={"job": job.model_dump(mode="json")}, queue="render.any")
        with pytest.raises(JobFailed, match=re.escape("is for flux.2-klein-4b; this worker holds flux.1-dev")):
            JobHandle(job, async_result=sent, stored=None).result(timeout=RESULT_TIMEOUT_S)


def test_a_kontext_job_edits_its_input_image_and_the_metadata_names_its_sha256(fleet: Fleet) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(buffer, "PNG")
    png = buffer.getvalue()
    job = {"prompt": "make the wall blue", "model": "flux.1-kontext-dev", "images": [as_inline_png(png)], **SMALL}
    with FarmClient(fleet.settings) as client:
        result = client.submit({**job, "dataset": "edits"}).result(RESULT_TIMEOUT_S)
        stored = Image.open(io.BytesIO(client.store.get(result.image.key)))
    assert result.worker.node == "w-kontext" and result.job.model == FluxModel.FLUX_1_KONTEXT_DEV
    assert [(image.source, image.sha256) for image in result.input_images] == [
        ("inline", hashlib.sha256(png).hexdigest())
    ]
    assert stored.size == (256, 256), "the job's size, not the input's"
