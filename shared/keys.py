"""Every Redis key the farm writes, named in one place (as arq does), so an operator reading Redis, an
ACL author (infra/redis/users.acl) and a test all find them here.

The style: `fluxfarm:` then segments joined by ':', words within a segment joined by '-'. One key keeps
an older spelling, `fluxfarm:dead_letters`: renaming it would hide the dead letters already in a farm's
Redis. kombu's keys (the queue lists, `unacked`, `unacked_index`, `_kombu.binding.*`) and Celery's results
(`celery-task-meta-<task id>`) keep their libraries' names.
"""

from __future__ import annotations

DATASETS = "fluxfarm:datasets"
"""A set: the active datasets (status, the exporter and the lost-job sweep go through these)."""
DATASETS_RETIRED = "fluxfarm:datasets:retired"
"""A set: finished datasets past FLUXFARM_DATASET_RETENTION_S, whose records stay readable by name."""
AUDIT = "fluxfarm:audit"
"""A stream: the gateway's audit records (producer/gateway/audit.py), the newest 100,000."""
DEAD_LETTERS = "fluxfarm:dead_letters"
"""A list: the newest dead letters first, capped."""
ADDED_QUEUES = "fluxfarm:queues"
"""A hash: LoRA-set or tenant queue -> when a job was last sent to it (shared/queue_registry.py)."""
QUEUE_ADDED_CHANNEL = "fluxfarm:queue-added"
"""A channel: a sender that registers a new queue says so here, and workers take it up at once."""
RETRIES_DUE = "fluxfarm:retries:due"
"""A sorted set: `<dataset>:<job id>` (the task id) -> when (Redis' clock) the job is sent again."""
LOST_JOBS_LOCK = "fluxfarm:lost-jobs:lock"
"""Held by the worker sweeping for lost jobs this interval."""
LOST_JOBS_MISSING = "fluxfarm:lost-jobs:missing"
"""A hash: `<dataset>/<job id>` -> when (Redis' clock) the job was first seen without a message."""
CALIBRATIONS = "fluxfarm:calibrations"
"""A hash: calibration id -> its row as JSON (`fluxfarm calibrate`: a level's agreement with bf16 on given weights)."""
WORKER_PREFIX = "fluxfarm:worker:"
"""`fluxfarm:worker:<node>`: a worker's heartbeat (its WorkerStatus as JSON), expiring with it."""

UNACKED = "unacked"
"""kombu's hash of unacknowledged messages (its default `unacked_key`)."""
UNACKED_INDEX = "unacked_index"
"""kombu's sorted set of unacked delivery tags (its default `unacked_index_key`)."""


def dataset(name: str, part: str) -> str:
    """`fluxfarm:dataset:<name>:<part>`: one part of a dataset's record (shared/datasets.py)."""
    return f"fluxfarm:dataset:{name}:{part}"


def worker(node: str) -> str:
    return f"{WORKER_PREFIX}{node}"


def claim(dataset: str, job_id: str) -> str:
    """`fluxfarm:claim:<dataset>:<job id>`: the live worker rendering the job, expiring with its lease."""
    return f"fluxfarm:claim:{dataset}:{job_id}"


def token_datasets(name: str) -> str:
    """`fluxfarm:token:<name>:datasets`: a set, the datasets a gateway token has submitted to."""
    return f"fluxfarm:token:{name}:datasets"


def token_submit_lock(name: str) -> str:
    """`fluxfarm:token:<name>:submitting`: a lock, held by the gateway while it checks a token's
    `max_queued` and sends its jobs, so two requests at once cannot both take the last room."""
    return f"fluxfarm:token:{name}:submitting"


def token_usage(name: str) -> str:
    """`fluxfarm:token:<name>:usage`: a hash, what a gateway token has used (jobs submitted, ...)."""
    return f"fluxfarm:token:{name}:usage"


def export(dataset: str, export_id: str) -> str:
    """`fluxfarm:export:<dataset>:<id>`: a hash, one gateway export's state, expiring a week after it ends."""
    return f"fluxfarm:export:{dataset}:{export_id}"


def export_lease(dataset: str, export_id: str) -> str:
    """`fluxfarm:export:<dataset>:<id>:lease`: present while a live gateway holds the export (queued or running),
    renewed by it; an export whose lease is gone was interrupted with its gateway."""
    return f"fluxfarm:export:{dataset}:{export_id}:lease"


def lora_adopt_lock(queue: str) -> str:
    """`fluxfarm:lora-adopt:<queue>`: the worker adopting an orphaned LoRA-set queue now."""
    return f"fluxfarm:lora-adopt:{queue}"


TOKENS = "fluxfarm:tokens"
"""A hash: sha256 of a gateway token -> its record (producer/gateway/tokens.py); the token itself is never kept."""
TOKEN_NAMES = "fluxfarm:token-names"
"""A hash: a token's name -> the sha256 it is filed under, for `fluxfarm token list | revoke`."""
