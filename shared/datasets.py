"""The dataset record in Redis: which of a dataset's jobs are queued, running, done or failed.

Producers add job ids to `queued` after their messages are published; the worker moves each id to
`running` when it starts and to `done` or `failed` when it ends; `fluxfarm cancel` moves every
queued id to `cancelled`, and a worker drops a cancelled job's message without rendering it. The
states are sets, not counters, so redeliveries, resubmits and retries cannot count a job twice, and
a resubmit can tell which jobs are already waiting without asking storage. Storage stays the truth
for what is finished: a job whose metadata JSON exists is done whatever Redis says (Redis may be
flushed; storage is not). Each done job also carries its finishing time (Redis' own clock, so
workers' clocks do not matter) in a sorted set: the dataset's rate, ETA and result stream read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

import redis
from pydantic import BaseModel, ConfigDict, computed_field

from fluxfarm.shared import keys
from fluxfarm.shared.job_records import DeadLetter, SentJob
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.rates import RATE_WINDOW_S, per_hour
from fluxfarm.shared.record_scripts import MARK_DONE, READ_RECORDS, RETIRE
from fluxfarm.shared.redis_conn import redis_now, text

MAX_DEAD_LETTERS = 10_000
"""keys.DEAD_LETTERS keeps this many, newest first."""
RECORDS_PER_CALL = 500
"""Dataset records read by one READ_RECORDS call."""
DEAD_LETTERS_READ = 500
"""Dead letters read at a time when looking for one dataset's."""


class JobState(StrEnum):
    """Where a job of a dataset is: each job is in exactly one, a set per state in its record."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATES = tuple(JobState)
_RECORD_PARTS = ("meta", *STATES, "levels", "failures", "done_at")
"""The keys of a dataset's record READ_RECORDS reads, in its order."""
MAX_FAILURE_CHARS = 500


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
    cancelled: int = 0
    rate_per_hour: float | None = None
    """Jobs finished per hour over the last RATE_WINDOW_S (None before the first one)."""
    defaults: dict[str, Any]
    """The job defaults of its most recent file submit (CLI options)."""
    levels: list[str]
    """The quantization levels its images were rendered at."""
    failures: dict[str, str]
    """Failed job id -> the reason, as the worker reported it."""
    gpu_seconds: float = 0.0
    """GPU time its rendered images took (each its share of its batch: encode, denoise, decode, adapters)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.queued + self.running + self.done + self.failed + self.cancelled

    @computed_field  # type: ignore[prop-decorator]
    @property
    def eta_s(self) -> float | None:
        """Seconds until nothing is queued or running, at the recent rate (None when unknown)."""
        left = self.queued + self.running
        if left == 0:
            return 0.0
        return left / self.rate_per_hour * 3600 if self.rate_per_hour else None


def error_field(job_id: str) -> str:
    """The field of a job's last failed attempt's reason in the dataset's `attempts` hash, beside its count
    (`job_id`): one hash, so a job done clears both with one HDEL. Job ids never hold a '/'."""
    return f"{job_id}/error"


class DatasetBook:
    """Reads and writes dataset records in the broker's Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._mark_done = client.register_script(MARK_DONE)
        self._retire = client.register_script(RETIRE)
        self._read_records = client.register_script(READ_RECORDS)

    @classmethod
    def from_url(cls, url: str) -> DatasetBook:
        """Tests and local tools on a plain redis:// URL; farm processes pass `open_redis(settings)`."""
        return cls(redis.Redis.from_url(url))

    def close(self) -> None:
        self._redis.close()

    def _touch(self, pipe: Any, dataset: str) -> None:
        now = datetime.now(UTC).isoformat()
        pipe.sadd(keys.DATASETS, dataset)
        pipe.srem(keys.DATASETS_RETIRED, dataset)
        pipe.hsetnx(keys.dataset(dataset, "meta"), "created_at", now)
        pipe.hset(keys.dataset(dataset, "meta"), "updated_at", now)

    def set_defaults(self, dataset: str, defaults: Mapping[str, Any]) -> None:
        with self._redis.pipeline() as pipe:
            self._touch(pipe, dataset)
            pipe.hset(keys.dataset(dataset, "meta"), "defaults", json.dumps(dict(defaults), sort_keys=True))
            pipe.execute()

    def _move(self, dataset: str, ids: list[str], state: JobState, pipe: Any) -> None:
        """Queue commands that put `ids` in `state` and in no other: a job is in one state at a time."""
        self._touch(pipe, dataset)
        for other in STATES:
            if other != state:
                pipe.srem(keys.dataset(dataset, other), *ids)
        if state != JobState.FAILED:
            pipe.hdel(keys.dataset(dataset, "failures"), *ids)
        if state != JobState.DONE:
            pipe.zrem(keys.dataset(dataset, "done_at"), *ids)
        pipe.sadd(keys.dataset(dataset, state), *ids)

    def note_queued(self, dataset: str, sent: Iterable[SentJob]) -> None:
        """Jobs whose messages are published (call after publishing: a crash in between re-sends, never
        loses). What was sent is kept until the job is done, so a lost message can be sent again."""
        records = {record.job["job_id"]: record.model_dump_json() for record in sent}
        ids = list(records)
        if ids:
            with self._redis.pipeline() as pipe:
                self._move(dataset, ids, JobState.QUEUED, pipe)
                pipe.hset(keys.dataset(dataset, "sent"), mapping=records)
                # a resubmit gets a fresh set of attempts, and no last error
                pipe.hdel(keys.dataset(dataset, "attempts"), *ids, *map(error_field, ids))
                pipe.execute()

    def forget_queued(self, dataset: str, job_ids: list[str]) -> None:
        """Take back jobs noted queued whose messages were never sent (Redis refused them). Deletes only,
        which a Redis over maxmemory still takes, in a plain pipeline (it refuses a MULTI block)."""
        if job_ids:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.srem(keys.dataset(dataset, JobState.QUEUED), *job_ids)
                pipe.hdel(keys.dataset(dataset, "sent"), *job_ids)
                pipe.execute()

    def queued_footprint(self, datasets: list[str]) -> int:
        """The bytes the records of `datasets`' queued and running jobs take (MEMORY USAGE, sampled): each
        such job holds its sent record and a place in a state set until it is done."""
        with self._redis.pipeline(transaction=False) as pipe:
            for dataset in datasets:
                for part in ("sent", JobState.QUEUED, JobState.RUNNING):
                    pipe.memory_usage(keys.dataset(dataset, part))
            return sum(size or 0 for size in pipe.execute())

    def mark_running(self, dataset: str, job_id: str) -> bool:
        """One SMOVE where the job is queued (the common case: the dataset is active, and a queued job is in
        no other state); a full move otherwise (a redelivered or resent job). False, moving nothing, where
        the job is cancelled: a cancel takes queued jobs out of `queued` atomically, so the SMOVE that
        succeeds is also the check that the job was not cancelled, and only a job found elsewhere needs
        the cancelled set read."""
        if self._redis.smove(keys.dataset(dataset, JobState.QUEUED), keys.dataset(dataset, JobState.RUNNING), job_id):
            return True
        if self._redis.sismember(keys.dataset(dataset, JobState.CANCELLED), job_id):
            return False
        with self._redis.pipeline() as pipe:
            self._move(dataset, [job_id], JobState.RUNNING, pipe)
            pipe.execute()
        return True

    def attempts(self, dataset: str, job_id: str) -> int:
        """Render attempts the job has started (and not finished) so far."""
        return int(self._redis.hget(keys.dataset(dataset, "attempts"), job_id) or 0)

    def start_attempt(self, dataset: str, job_id: str) -> int:
        """Count an attempt as its render begins; returns its number (1 for the first). A job that
        kills its worker runs out of attempts too; one that waited in a dying worker does not."""
        return int(self._redis.hincrby(keys.dataset(dataset, "attempts"), job_id, 1))

    def note_attempt_failed(self, dataset: str, job_id: str, reason: str) -> None:
        """An attempt failed and the job goes back to the queue; the reason is kept for its dead
        letter, should no attempt succeed."""
        with self._redis.pipeline() as pipe:
            self._move(dataset, [job_id], JobState.QUEUED, pipe)
            pipe.hset(keys.dataset(dataset, "attempts"), error_field(job_id), reason[:MAX_FAILURE_CHARS])
            pipe.execute()

    def last_error(self, dataset: str, job_id: str) -> str | None:
        value = self._redis.hget(keys.dataset(dataset, "attempts"), error_field(job_id))
        return text(value) if value is not None else None

    def dead_letter(self, letter: DeadLetter) -> None:
        """Give up on a job: it is failed with the reason, and its letter heads the dead-letter list."""
        with self._redis.pipeline() as pipe:
            self._move(letter.dataset, [letter.job_id], JobState.FAILED, pipe)
            pipe.hdel(keys.dataset(letter.dataset, "sent"), letter.job_id)
            pipe.hset(keys.dataset(letter.dataset, "failures"), letter.job_id, letter.reason[:MAX_FAILURE_CHARS])
            pipe.lpush(keys.DEAD_LETTERS, letter.model_dump_json())
            pipe.ltrim(keys.DEAD_LETTERS, 0, MAX_DEAD_LETTERS - 1)
            pipe.execute()

    def dead_letters(self, limit: int = 20, dataset: str | None = None) -> list[DeadLetter]:
        """The newest dead letters (of one dataset when given), newest first. One dataset's are read from the
        farm-wide list in chunks until `limit` are found, and not at all while the dataset's record holds no
        failure (every dead letter fails its job there): a dataset's page or status costs one HLEN, not a read
        of MAX_DEAD_LETTERS letters."""
        if dataset is None:
            return [DeadLetter.model_validate_json(raw) for raw in self._redis.lrange(keys.DEAD_LETTERS, 0, limit - 1)]
        if not self._redis.hlen(keys.dataset(dataset, "failures")):
            return []
        found: list[DeadLetter] = []
        for start in range(0, MAX_DEAD_LETTERS, DEAD_LETTERS_READ):
            rows = self._redis.lrange(keys.DEAD_LETTERS, start, start + DEAD_LETTERS_READ - 1)
            found += [letter for raw in rows if (letter := DeadLetter.model_validate_json(raw)).dataset == dataset]
            if len(found) >= limit or len(rows) < DEAD_LETTERS_READ:
                break
        return found[:limit]

    def dead_letter_count(self) -> int:
        """Dead letters kept (at most MAX_DEAD_LETTERS)."""
        return int(self._redis.llen(keys.DEAD_LETTERS))

    def mark_done(
        self, dataset: str, job_id: str, level: str | None, gpu_s: float = 0.0, claim_owner: str | None = None
    ) -> None:
        """`level`: added to the dataset's levels (None: the caller knows it is there). `gpu_s`: the GPU time
        the job took (its share of its batch), added to the dataset's total. `claim_owner`: the job's claim
        (worker/serve/leases.py) is released if that owner still holds it. One script (`MARK_DONE`): about
        half the commands of a general move, and atomic as one."""
        others = [keys.dataset(dataset, state) for state in (JobState.QUEUED, JobState.FAILED, JobState.CANCELLED)]
        parts = ("failures", "sent", "attempts", "levels", "meta", "done_at")
        self._mark_done(
            keys=[
                keys.dataset(dataset, JobState.RUNNING),
                keys.dataset(dataset, JobState.DONE),
                *others,
                *(keys.dataset(dataset, part) for part in parts),
                keys.DATASETS,
                keys.DATASETS_RETIRED,
                keys.claim(dataset, job_id),
            ],
            args=[
                job_id,
                level or "",
                repr(float(gpu_s)),
                dataset,
                datetime.now(UTC).isoformat(),
                error_field(job_id),
                claim_owner or "",
            ],
        )

    def cancel(self, dataset: str) -> int:
        """Move every queued job to `cancelled` at once (running ones finish); returns how many.
        Their messages stay in the queue until a worker takes and drops them, without rendering."""
        queued, cancelled = keys.dataset(dataset, JobState.QUEUED), keys.dataset(dataset, JobState.CANCELLED)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.scard(queued)
            pipe.sunionstore(cancelled, [cancelled, queued])
            pipe.delete(queued)
            self._touch(pipe, dataset)
            count = pipe.execute()[0]
        dropped = [member for member in self._redis.sscan_iter(cancelled, count=1000)]
        for start in range(0, len(dropped), 1000):  # their messages are dropped, never sent again
            self._redis.hdel(keys.dataset(dataset, "sent"), *dropped[start : start + 1000])
        return int(count)

    def usage(self, datasets: Iterable[str]) -> tuple[int, float]:
        """(images done, GPU seconds they took) over all of `datasets`."""
        with self._redis.pipeline(transaction=False) as pipe:
            for dataset in datasets:
                pipe.scard(keys.dataset(dataset, JobState.DONE))
                pipe.hget(keys.dataset(dataset, "meta"), "gpu_seconds")
            replies = pipe.execute()
        return sum(replies[0::2]), sum(float(seconds or 0) for seconds in replies[1::2])

    def in_flight(self, datasets: Iterable[str]) -> int:
        """Jobs queued or running, over all of `datasets`."""
        with self._redis.pipeline(transaction=False) as pipe:
            for dataset in datasets:
                pipe.scard(keys.dataset(dataset, JobState.QUEUED))
                pipe.scard(keys.dataset(dataset, JobState.RUNNING))
            return sum(pipe.execute())

    def job_state(self, dataset: str, job_id: str) -> JobState | None:
        """Where the job is in its dataset's record; None for a job the record does not hold."""
        with self._redis.pipeline(transaction=False) as pipe:
            for state in STATES:
                pipe.sismember(keys.dataset(dataset, state), job_id)
            found = pipe.execute()
        return next((state for state, member in zip(STATES, found, strict=True) if member), None)

    def failure(self, dataset: str, job_id: str) -> str | None:
        """Why a failed job failed, as the worker reported it."""
        value = self._redis.hget(keys.dataset(dataset, "failures"), job_id)
        return text(value) if value is not None else None

    def finished_since(self, dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]:
        """(job id, finishing time) of the done jobs that finished at or after `since` (Redis' clock),
        oldest first, at most `limit` of them: a stream of results reads this with its last time as the next
        `since` (producer/dataset_stream.py)."""
        start = None if limit is None else 0
        rows = cast(
            list[tuple[bytes, float]],
            self._redis.zrangebyscore(
                keys.dataset(dataset, "done_at"), since, "+inf", start=start, num=limit, withscores=True
            ),
        )
        return [(text(member), float(score)) for member, score in rows]

    def sent_job(self, dataset: str, job_id: str) -> SentJob | None:
        """What was published for a job still queued (None once it is done, failed or unknown)."""
        raw = self._redis.hget(keys.dataset(dataset, "sent"), job_id)
        return SentJob.model_validate_json(raw) if raw is not None else None

    def queued_for_another(self, job: RenderJob) -> bool:
        """True when `job`'s id is queued or running for another job of its dataset. Only a named job can
        meet one: a content id names one job's parameters."""
        sent = self.sent_job(job.dataset, job.id) if job.named else None
        return sent is not None and not sent.is_of(job)

    def waiting_ids(self, dataset: str, among: Sequence[str] | None = None) -> set[str]:
        """Jobs queued or running (of `among` only, asked id by id, where given): not sent again."""
        states = [keys.dataset(dataset, JobState.QUEUED), keys.dataset(dataset, JobState.RUNNING)]
        if among is None:
            return {text(member) for member in self._redis.sunion(states)}
        with self._redis.pipeline(transaction=False) as pipe:
            for name in states:
                pipe.smismember(name, list(among))
            found = pipe.execute()
        return {job_id for job_id, *flags in zip(among, *found, strict=True) if any(flags)}

    def _read_only(self, script: Any, names: list[str], args: list[Any]) -> Any:
        """`script` (registered, flagged no-writes) by EVALSHA_RO: the exporter's Redis user may run read-only
        scripts and nothing else of scripting (infra/redis/users.acl)."""
        try:
            return self._redis.evalsha_ro(script.sha, len(names), *names, *args)
        except redis.exceptions.NoScriptError:
            self._redis.script_load(script.script)
            return self._redis.evalsha_ro(script.sha, len(names), *names, *args)

    def waiting_by_dataset(self, datasets: Sequence[str]) -> dict[str, set[str]]:
        """Each dataset's queued or running jobs, RECORDS_PER_CALL datasets a round trip (the lost-job sweep
        reads every active dataset's: 20,000 round trips were 1.5 s)."""
        found: dict[str, set[str]] = {}
        for start in range(0, len(datasets), RECORDS_PER_CALL):
            chunk = datasets[start : start + RECORDS_PER_CALL]
            with self._redis.pipeline(transaction=False) as pipe:
                for dataset in chunk:
                    pipe.sunion([keys.dataset(dataset, JobState.QUEUED), keys.dataset(dataset, JobState.RUNNING)])
                replies = pipe.execute()
            for dataset, reply in zip(chunk, replies, strict=True):
                found[dataset] = {text(member) for member in reply}
        return found

    def names(self) -> list[str]:
        """The active datasets (what status, the exporter and the lost-job sweep go through)."""
        return sorted(text(name) for name in self._redis.smembers(keys.DATASETS))

    def retire_finished(self, retention_s: float) -> list[str]:
        """Move datasets with nothing queued or running, untouched for `retention_s`, out of the active
        index, so the cost of status, the exporter and the sweep grows with active datasets, not with
        history. Returns the names retired."""
        cutoff = (datetime.now(UTC) - timedelta(seconds=retention_s)).isoformat()
        retired = []
        for name in self.names():
            record = [keys.dataset(name, part) for part in (JobState.QUEUED, JobState.RUNNING, "meta")]
            if self._retire(keys=[keys.DATASETS, keys.DATASETS_RETIRED, *record], args=[name, cutoff]):
                retired.append(name)
        return retired

    def record(self, dataset: str) -> DatasetRecord:
        return self.records([dataset])[0]

    def records(self, datasets: Sequence[str]) -> list[DatasetRecord]:
        """The records of `datasets`, RECORDS_PER_CALL of them a command (READ_RECORDS). A read, never a
        transaction: `fluxfarm status` must answer most of all when Redis is over maxmemory."""
        now = redis_now(self._redis)
        found: list[DatasetRecord] = []
        for start in range(0, len(datasets), RECORDS_PER_CALL):
            chunk = datasets[start : start + RECORDS_PER_CALL]
            names = [keys.dataset(dataset, part) for dataset in chunk for part in _RECORD_PARTS]
            replies = self._read_only(self._read_records, names, [now - RATE_WINDOW_S])
            found.extend(_record(dataset, reply, now) for dataset, reply in zip(chunk, replies, strict=True))
        return found


def _pairs(flat: list[bytes]) -> dict[str, str]:
    """A hash as Lua returns HGETALL: field, value, field, value..."""
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def _record(dataset: str, reply: list[Any], now: float) -> DatasetRecord:
    """One dataset's record from its part of READ_RECORDS' reply."""
    meta_flat, queued, running, done, failed, cancelled, levels, failures, first, recent = reply
    meta = _pairs(meta_flat)

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
        cancelled=cancelled,
        rate_per_hour=per_hour(recent, float(first), now) if first else None,
        defaults=json.loads(meta.get("defaults", "{}")),
        levels=sorted(level.decode() for level in levels),
        failures=_pairs(failures),
        gpu_seconds=float(meta.get("gpu_seconds", 0)),
    )
