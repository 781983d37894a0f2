"""The dataset record in Redis: which of a dataset's jobs are queued, running, done or failed.

Producers add job ids to `queued` after their messages are published; the worker moves each id to
`running` when it starts and to `done` or `failed` when it ends. The states are sets, not counters,
so redeliveries, resubmits and retries cannot count a job twice, and a resubmit can tell which jobs
are already waiting without asking storage. Storage stays the truth for what is finished: a job
whose metadata JSON exists is done whatever Redis says (Redis may be flushed; storage is not).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

DATASETS_KEY = "fluxfarm:datasets"
"""A set of every dataset name the farm has seen."""
STATES = ("queued", "running", "done", "failed")
MAX_FAILURE_CHARS = 500


def _key(dataset: str, part: str) -> str:
    return f"fluxfarm:dataset:{dataset}:{part}"


class DatasetRecord(BaseModel):
    """A dataset's progress as the farm sees it now."""

    model_config = ConfigDict(frozen=True)

    name: str
    created_at: datetime | None
    updated_at: datetime | None
    queued: int
    running: int
    done: int
    failed: int
    defaults: dict[str, Any]
    """The job defaults of its most recent file submit (CLI options)."""
    levels: list[str]
    """The quantization levels its images were rendered at."""
    failures: dict[str, str]
    """Failed job id -> the reason, as the worker reported it."""

    @property
    def total(self) -> int:
        return self.queued + self.running + self.done + self.failed


class DatasetBook:
    """Reads and writes dataset records in the broker's Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> DatasetBook:
        return cls(redis.Redis.from_url(url))

    def close(self) -> None:
        self._redis.close()

    def _touch(self, pipe: Any, dataset: str) -> None:
        now = datetime.now(UTC).isoformat()
        pipe.sadd(DATASETS_KEY, dataset)
        pipe.hsetnx(_key(dataset, "meta"), "created_at", now)
        pipe.hset(_key(dataset, "meta"), "updated_at", now)

    def set_defaults(self, dataset: str, defaults: Mapping[str, Any]) -> None:
        with self._redis.pipeline() as pipe:
            self._touch(pipe, dataset)
            pipe.hset(_key(dataset, "meta"), "defaults", json.dumps(dict(defaults), sort_keys=True))
            pipe.execute()

    def _move(self, dataset: str, ids: list[str], state: str, pipe: Any) -> None:
        """Queue commands that put `ids` in `state` and in no other: a job is in one state at a time."""
        self._touch(pipe, dataset)
        for other in STATES:
            if other != state:
                pipe.srem(_key(dataset, other), *ids)
        if state != "failed":
            pipe.hdel(_key(dataset, "failures"), *ids)
        pipe.sadd(_key(dataset, state), *ids)

    def note_queued(self, dataset: str, job_ids: Iterable[str]) -> None:
        """Jobs whose messages are published (call after publishing: a crash in between re-sends, never loses)."""
        ids = list(job_ids)
        if ids:
            with self._redis.pipeline() as pipe:
                self._move(dataset, ids, "queued", pipe)
                pipe.execute()

    def mark_running(self, dataset: str, job_id: str) -> None:
        with self._redis.pipeline() as pipe:
            self._move(dataset, [job_id], "running", pipe)
            pipe.execute()

    def mark_done(self, dataset: str, job_id: str, level: str) -> None:
        with self._redis.pipeline() as pipe:
            self._move(dataset, [job_id], "done", pipe)
            pipe.sadd(_key(dataset, "levels"), level)
            pipe.execute()

    def mark_failed(self, dataset: str, job_id: str, reason: str) -> None:
        with self._redis.pipeline() as pipe:
            self._move(dataset, [job_id], "failed", pipe)
            pipe.hset(_key(dataset, "failures"), job_id, reason[:MAX_FAILURE_CHARS])
            pipe.execute()

    def waiting_ids(self, dataset: str) -> set[str]:
        """Jobs queued or running: a resubmit does not send them again."""
        members = self._redis.sunion(_key(dataset, "queued"), _key(dataset, "running"))
        return {member.decode() for member in members}

    def names(self) -> list[str]:
        return sorted(name.decode() for name in self._redis.smembers(DATASETS_KEY))

    def record(self, dataset: str) -> DatasetRecord:
        with self._redis.pipeline() as pipe:
            pipe.hgetall(_key(dataset, "meta"))
            for state in STATES:
                pipe.scard(_key(dataset, state))
            pipe.smembers(_key(dataset, "levels"))
            pipe.hgetall(_key(dataset, "failures"))
            meta, queued, running, done, failed, levels, failures = pipe.execute()
        meta = {k.decode(): v.decode() for k, v in meta.items()}

        def moment(name: str) -> datetime | None:
            return datetime.fromisoformat(meta[name]) if name in meta else None

        return DatasetRecord(
            name=dataset,
            created_at=moment("created_at"),
            updated_at=moment("updated_at"),
            queued=queued,
            running=running,
            done=done,
            failed=failed,
            defaults=json.loads(meta.get("defaults", "{}")),
            levels=sorted(level.decode() for level in levels),
            failures={k.decode(): v.decode() for k, v in failures.items()},
        )
