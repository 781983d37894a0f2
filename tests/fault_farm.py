"""Helpers of the fault-injection tests: workers with drills, and the exactly-once check of a dataset."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from fluxfarm.producer.local_stack import WorkerProcess
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import RenderResult
from tests.conftest import S3Server, start_worker
from tests.host_settings import HostSettings

SMALL_JOB = {"width": 256, "height": 256, "steps": 2}


def fault_worker(
    settings: HostSettings,
    tiny_model: Path,
    log_path: Path,
    name: str,
    faults: dict | None = None,
    **env: str,
) -> WorkerProcess:
    """A Q8_0 worker on the tiny model; `faults` is its FaultPlan, `env` more FLUXFARM_* settings."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

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


def where_jobs_are(redis_url: str, dataset: str, job_ids: set[str], logs: list[str]) -> str:
    """Everything Redis and the worker logs say about `job_ids`: what a stuck-job failure reports."""
    import redis

    from fluxfarm.shared import keys
    from fluxfarm.shared.celery_app import message_task_id, queue_lists, task_id
    from fluxfarm.shared.datasets import STATES
    from fluxfarm.shared.queue_registry import known_queues
    from fluxfarm.worker.serve.leases import JobClaims

    client = redis.Redis.from_url(redis_url)
    now = client.time()[0]
    lines = []
    messages: dict[str, list[str]] = {}  # by Celery task id (dataset:job), as the messages carry it
    for queue in known_queues(client):
        for name in queue_lists(queue):
            for raw in client.lrange(name, 0, -1):
                messages.setdefault(message_task_id(raw) or "?", []).append(f"list {name}")
    index = {tag.decode(): score for tag, score in client.zrange(keys.UNACKED_INDEX, 0, -1, withscores=True)}
    for tag, raw in client.hgetall(keys.UNACKED).items():
        score = index.get(tag.decode())
        age = f"renewed {now - score:.0f}s ago" if score is not None else "NOT in unacked_index"
        messages.setdefault(message_task_id(raw) or "?", []).append(f"unacked tag {tag.decode()} ({age})")
    missing_since = client.hgetall(keys.LOST_JOBS_MISSING)
    for job_id in sorted(job_ids):
        key = f"fluxfarm:dataset:{dataset}:"
        states = [state for state in STATES if client.sismember(key + state, job_id)]
        claim = client.get(JobClaims.key(dataset, job_id))
        waiting = messages.get(task_id(dataset, job_id), [])
        lines.append(
            f"{job_id}: states {states}, attempts {client.hget(key + 'attempts', job_id)}, "
            f"error {client.hget(key + 'errors', job_id)}, sent copy {client.hexists(key + 'sent', job_id)}, "
            f"claim {claim} (pttl {client.pttl(JobClaims.key(dataset, job_id))}), "
            f"messages {waiting}, missing since {missing_since.get(f'{dataset}/{job_id}'.encode())}"
        )
        for i, text in enumerate(logs):
            lines += [f"  w-{i}: {line}" for line in text.splitlines() if job_id in line][-12:]
    return "\n".join(lines)
