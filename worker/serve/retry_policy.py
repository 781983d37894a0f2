"""When a render attempt fails: counted, backed off without holding a thread, given up on at the end.

- An attempt is counted when its render begins (DatasetBook.start_attempt), not when it fails: a job
  that kills its worker uses an attempt too, so it cannot crash-loop the fleet.
- A job whose own inputs cannot be used (a missing LoRA, an oversized control image) is dead-lettered at
  once: another attempt would fail the same way. So is a job whose `max_attempts` are spent.
- Otherwise the reason goes into the job's record and the job into the delayed-retry set (keys.RETRIES_DUE:
  task id -> due time, Redis' clock), and its message is acknowledged: the task thread is free at once
  and the worker renders other jobs during the back-off. Every worker's `DelayedRetries.send_due`
  publishes the jobs whose time has come again, their record kept as it is (shared/publish.py).
- Where the set cannot be written (Redis away or full) the message goes back to its queue at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

import redis

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import task_id
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import JobCancelled, JobDeadLettered, RenderAttemptFailed
from fluxfarm.shared.job_records import DeadLetter, SentJob
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.redis_conn import redis_now
from fluxfarm.worker.serve.redis_writes import unless_redis_is_down

log = logging.getLogger(__name__)

SEND_DUE_INTERVAL_S = 1.0
DUE_PER_ROUND = 100


class RetryScheduled(RenderAttemptFailed):
    """The attempt failed and the job waits in the delayed-retry set: its message is acknowledged."""


def backing_off(client: redis.Redis) -> set[str]:
    """Task ids of the jobs waiting out a back-off: they have no message, and are not lost."""
    return {member.decode() for member in client.zrange(keys.RETRIES_DUE, 0, -1)}


class RetryPolicy:
    """Attempts and back-off for one worker's job runner."""

    def __init__(
        self,
        client: redis.Redis,
        book: DatasetBook,
        node: str,
        max_attempts: int,
        backoff_s: float,
        backoff_max_s: float,
    ) -> None:
        self._redis = client
        self._book = book
        self._node = node
        self.max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s

    def begin(self, job: RenderJob) -> None:
        """Before an attempt: the job marked running, or JobCancelled where its dataset was cancelled."""
        if not self._book.mark_running(job.dataset, job.id):
            log.info("job %s: dataset %s was cancelled; dropping it without rendering", job.id, job.dataset)
            raise JobCancelled(f"dataset {job.dataset} was cancelled before job {job.id} started")

    def count_start(self, job: RenderJob) -> int:
        """As the render begins: count the attempt; returns its number (1 for the first). One past the
        attempts allowed means its worker died during each of them: the job is dead-lettered (JobDeadLettered)
        instead of rendered, so a job that kills workers cannot go round for ever."""
        attempt = self._book.start_attempt(job.dataset, job.id)
        if attempt > self.max_attempts:
            started = attempt - 1
            last = self._book.last_error(job.dataset, job.id)
            died = f"its worker died during each of its last attempts ({started} in all)"
            self.give_up(job, f"{started} attempts, the last error: {last}" if last else died, started)
        return attempt

    def started(self, job: RenderJob) -> int:
        """Attempts counted so far: a failure before its render began is numbered one past them."""
        return self._book.attempts(job.dataset, job.id)

    def failed(self, job: RenderJob, attempt: int, reason: str, input_error: bool) -> NoReturn:
        """After failed attempt number `attempt`: dead-letter the job, or send it back after its back-off
        (doubling from FLUXFARM_RETRY_BACKOFF_S) through the delayed-retry set (RetryScheduled), or at once
        through its queue where Redis cannot take the entry (RenderAttemptFailed)."""
        if input_error:  # another attempt would fail the same way
            self.give_up(job, f"the job's input cannot be used: {reason}", attempt)
        if attempt >= self.max_attempts:
            self.give_up(job, f"{attempt} attempts failed, the last: {reason}", attempt)
        pause_s = min(self._backoff_s * 2.0 ** (attempt - 1), self._backoff_max_s)
        what = f"attempt {attempt}/{self.max_attempts} failed"
        unless_redis_is_down(
            lambda: self._book.note_attempt_failed(job.dataset, job.id, reason), f"job {job.id}'s failure"
        )

        def schedule() -> None:
            self._redis.zadd(keys.RETRIES_DUE, {task_id(job.dataset, job.id): redis_now(self._redis) + pause_s})

        if unless_redis_is_down(schedule, f"job {job.id}'s retry"):
            log.warning("job %s %s (%s); sent again in %.0fs", job.id, what, reason, pause_s)
            raise RetryScheduled(reason)
        log.warning("job %s %s (%s); back to its queue now", job.id, what, reason)
        raise RenderAttemptFailed(reason)

    def give_up(self, job: RenderJob, reason: str, attempts: int) -> NoReturn:
        letter = DeadLetter(
            dataset=job.dataset,
            job_id=job.id,
            reason=reason,
            attempts=attempts,
            node=self._node,
            at=datetime.now(UTC),
            job=job.model_dump(mode="json"),
        )
        self._book.dead_letter(letter)
        # A copy delivered while the job waited out a back-off (a resubmit, a lost-job resend) ends it here.
        self._redis.zrem(keys.RETRIES_DUE, task_id(job.dataset, job.id))
        log.error("job %s dead-lettered: %s", job.id, reason)
        raise JobDeadLettered(f"job {job.id} dead-lettered: {reason}")


class DelayedRetries:
    """Sends the jobs of the delayed-retry set again once their back-off is over (every worker runs
    `send_due`; ZREM decides which one sends each)."""

    def __init__(self, client: redis.Redis, book: DatasetBook, resend: Callable[[SentJob], None]) -> None:
        self._redis = client
        self._book = book
        self._resend = resend

    def send_due(self) -> list[str]:
        """Publish the jobs whose back-off is over; returns their task ids."""
        sent: list[str] = []
        for member in self._redis.zrangebyscore(keys.RETRIES_DUE, "-inf", redis_now(self._redis), 0, DUE_PER_ROUND):
            if not self._redis.zrem(keys.RETRIES_DUE, member):
                continue  # another worker took it
            dataset, _, job_id = member.decode().partition(":")
            record = self._book.sent_job(dataset, job_id)
            if record is None:
                continue  # done, dead-lettered or cancelled meanwhile; a crash here leaves it to the lost-job sweep
            self._resend(record)
            sent.append(member.decode())
        return sent
