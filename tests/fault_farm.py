"""Helpers of the fault-injection tests: workers with drills, and the exactly-once check of a dataset."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from producer.local_stack import WorkerProcess
from shared.ladder import QuantLevel
from shared.metadata import RenderResult
from shared.settings import FarmSettings
from tests.conftest import S3Server, start_worker

SMALL_JOB = {"width": 256, "height": 256, "steps": 2}


def fault_worker(
    settings: FarmSettings,
    tiny_model: Path,
    log_path: Path,
    name: str,
    faults: dict | None = None,
    **env: str,
) -> WorkerProcess:
    """A Q8_0 worker on the tiny model; `faults` is its FaultPlan, `env` more FLUXFARM_* settings."""
    from worker.tiny_model import gguf_path

    extra = {f"FLUXFARM_{key.upper()}": value for key, value in env.items()}
    if faults:
        extra["FLUXFARM_INJECT_FAULTS"] = json.dumps(faults)
    return start_worker(settings, tiny_model, gguf_path(tiny_model, QuantLevel.Q8_0), log_path, name, extra)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Seconds it took for `condition()` to hold; fails the test with `what` after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


def stored_once(s3: S3Server, bucket: str, prefix: str, dataset: str, job_ids: set[str]) -> list[RenderResult]:
    """Assert the dataset holds exactly one PNG and one JSON for each job and nothing else, and that
    every JSON describes the PNG beside it; returns the results."""
    folder = f"{prefix}/{dataset}/"
    keys = [key for key in s3.keys(bucket, folder) if "/fluxfarm/" not in key.removeprefix(folder)]
    expected = {f"{folder}{job_id}{suffix}" for job_id in job_ids for suffix in (".png", ".json")}
    assert sorted(keys) == sorted(expected), (
        f"missing {sorted(expected - set(keys))[:5]}, extra {sorted(set(keys) - expected)[:5]}"
    )
    client = s3.client()
    results = []
    for job_id in sorted(job_ids):
        result = RenderResult.model_validate_json(
            client.get_object(Bucket=bucket, Key=f"{folder}{job_id}.json")["Body"].read()
        )
        png = client.get_object(Bucket=bucket, Key=f"{folder}{job_id}.png")["Body"].read()
        assert result.image.sha256 == hashlib.sha256(png).hexdigest(), f"{job_id}: JSON and PNG disagree"
        results.append(result)
    return results


def renders_logged(logs: list[str], job_id: str) -> int:
    """How many times the workers' logs say they rendered and stored `job_id`."""
    return sum(text.count(f"rendered job {job_id} ") for text in logs)
