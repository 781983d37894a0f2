"""LoRA and ControlNet jobs through the whole farm: FarmClient -> Redis -> a worker process -> S3, with the
LoRA, the ControlNet and the control images read from S3; bad ones fail their job, not the worker."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from fluxfarm.producer.client import FarmClient
from fluxfarm.shared.adapters import INLINE_KEEP_BYTES, as_inline_png
from fluxfarm.shared.celery_app import task_id
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.adapter_files import (
    control_png,
    noise_png,
    write_lora_with_config,
    write_peft_lora,
    write_tiny_controlnet,
)
from tests.conftest import Farm, S3Server, fresh_farm_settings, start_worker

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 300
JOB = {"prompt": "a harbour at night", "width": 256, "height": 256, "steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def adapter_farm(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server, s3_server: S3Server
) -> Iterator[Farm]:
    bucket = s3_server.new_bucket()
    work = tmp_path_factory.mktemp("adapter-farm")
    s3 = s3_server.client()
    lora = write_peft_lora(tiny_model, work / "style")
    s3.upload_file(str(lora), bucket, "loras/style.safetensors")
    for path in write_tiny_controlnet(tiny_model, work / "canny").iterdir():
        s3.upload_file(str(path), bucket, f"controlnets/canny/{path.name}")
    s3.put_object(Bucket=bucket, Key="control/edges.png", Body=control_png(256, 256))
    Image.new("L", (4100, 4100)).save(work / "huge.png")
    s3.upload_file(str(work / "huge.png"), bucket, "control/huge.png")
    hostile = write_lora_with_config(work / "hostile", {"rank_pattern": {"(.|.|.)*#": 8}})
    s3.upload_file(str(hostile), bucket, "loras/hostile.safetensors")
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{bucket}/renders", work)
    worker = start_worker(
        settings, tiny_model, gguf_path(tiny_model, QuantLevel.Q8_0), work / "worker.log", "w-adapters"
    )
    yield Farm(settings=settings, bucket=bucket, prefix="renders", worker=worker, s3=s3_server)
    worker.stop()


def test_lora_and_controlnet_jobs_render_through_the_queue_and_bad_ones_fail_alone(adapter_farm: Farm) -> None:
    bucket = adapter_farm.bucket
    lora = {"source": f"s3://{bucket}/loras/style.safetensors", "weight": 0.8}
    controlnet = {
        "source": f"s3://{bucket}/controlnets/canny",
        "control_image": f"s3://{bucket}/control/edges.png",
        "conditioning_scale": 0.8,
    }
    bad = {
        "missing LoRA": {**JOB, "loras": [{"source": f"s3://{bucket}/loras/nope.safetensors"}]},
        "oversized control image": {
            **JOB,
            "controlnet": {**controlnet, "control_image": f"s3://{bucket}/control/huge.png"},
        },
        "worker path outside the roots": {**JOB, "loras": [{"source": "/etc/passwd.safetensors"}]},
    }
    with FarmClient(adapter_farm.settings) as client:
        plain = client.submit(JOB)
        with_lora = client.submit({**JOB, "loras": [lora]})
        with_controlnet = client.submit({**JOB, "controlnet": controlnet})
        failing = {case: client.submit(job) for case, job in bad.items()}
        after = client.submit({**JOB, "seed": 5, "loras": [lora]})
        handles = {"plain": plain, "lora": with_lora, "controlnet": with_controlnet, "after": after}
        results = {name: handle.result(RESULT_TIMEOUT_S) for name, handle in handles.items()}
        reasons = {}
        for case, handle in failing.items():
            with pytest.raises(JobFailed) as failure:
                handle.result(RESULT_TIMEOUT_S)
            reasons[case] = failure.value.reason
    assert "does not exist" in reasons["missing LoRA"]
    assert "4100x4100" in reasons["oversized control image"]
    assert "FLUXFARM_JOB_FILE_ROOTS" in reasons["worker path outside the roots"]
    assert results["plain"].loras == () and results["plain"].controlnet is None
    (fused,) = results["lora"].loras
    lora_bytes = adapter_farm.s3.client().get_object(Bucket=bucket, Key="loras/style.safetensors")["Body"].read()
    assert (fused.source, fused.weight, fused.sha256) == (lora["source"], 0.8, hashlib.sha256(lora_bytes).hexdigest())
    control = results["controlnet"].controlnet
    assert control is not None and control.source == controlnet["source"] and len(control.sha256) == 64
    edges = adapter_farm.s3.client().get_object(Bucket=bucket, Key="control/edges.png")["Body"].read()
    assert control.control_image_sha256 == hashlib.sha256(edges).hexdigest()
    images = {name: result.image.sha256 for name, result in results.items()}
    assert len(set(images.values())) == 4, "the LoRA and the ControlNet each change the image"
    assert adapter_farm.worker.process.poll() is None, "the bad jobs failed, the worker did not"


def test_a_lora_with_a_hostile_pattern_fails_in_seconds_and_the_worker_renders_on(adapter_farm: Farm) -> None:
    """Issue 18, finding 1, end to end: compiled as a regular expression, this pattern froze the worker
    for minutes per module name (heartbeat, leases and shutdown with it)."""
    hostile = {"source": f"s3://{adapter_farm.bucket}/loras/hostile.safetensors"}
    with FarmClient(adapter_farm.settings) as client:
        started = time.monotonic()
        handle = client.submit({**JOB, "seed": 21, "loras": [hostile]})
        with pytest.raises(JobFailed, match="not a module name"):
            handle.result(RESULT_TIMEOUT_S)
        assert time.monotonic() - started < 10
        assert client.submit({**JOB, "seed": 22}).result(RESULT_TIMEOUT_S).loras == ()


def test_a_large_inline_control_image_is_stored_once_and_never_sent_through_redis(adapter_farm: Farm) -> None:
    """Issue 18, finding 2: a 1 MiB inline image cost 3.5 MiB of Redis per job (message and dataset
    record), and the result backend kept the job's whole payload again."""
    image = noise_png(200, 200, seed=3)
    assert len(image) > INLINE_KEEP_BYTES
    digest = hashlib.sha256(image).hexdigest()
    controlnet = {
        "source": f"s3://{adapter_farm.bucket}/controlnets/canny",
        "control_image": as_inline_png(image),
        "conditioning_scale": 0.8,
    }
    job = {**JOB, "seed": 31, "dataset": "inline", "controlnet": controlnet}
    broker = redis.Redis.from_url(adapter_farm.settings.broker_url)
    with FarmClient(adapter_farm.settings) as client:
        handle = client.submit(job)
        assert handle.job.controlnet is not None and handle.job.controlnet.control_image == f"sha256:{digest}"
        sent = broker.hget("fluxfarm:dataset:inline:sent", handle.job_id)
        assert sent is None or len(sent) < 2048, "the dataset record holds the digest, not the image"
        result = handle.result(RESULT_TIMEOUT_S)
        again = client.submit(job)
    assert again.cached and again.job_id == handle.job_id, "the same image is the same job"
    assert result.controlnet is not None and result.controlnet.control_image_sha256 == digest
    stored = adapter_farm.s3.keys(adapter_farm.bucket, "renders/inline/fluxfarm/inputs/")
    assert stored == [f"renders/inline/fluxfarm/inputs/{digest}"]
    meta = broker.get(f"celery-task-meta-{task_id('inline', handle.job_id)}")
    assert meta is not None and b"harbour" not in meta and len(meta) < 4096, "no job payload in the backend"
