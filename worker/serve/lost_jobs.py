"""Find jobs whose message was lost and publish them again, so at-least-once holds where kombu's
Redis transport has a gap.

kombu takes a message off its queue with BRPOP and only then records it as unacknowledged; a worker
SIGKILLed while the popped message is still on its way (a busy process may read it late), or a Redis
restart in between, loses the message: nothing is left to redeliver (the chaos run caught one in
300; a Redis restart while a worker restores its messages is another way). The dataset record still
says the job is queued or running, and the producer left what it sent (`SentJob`). Every
`interval_s` one worker (a lock in Redis) compares those jobs with the messages in the queues and in
`unacked`; a job missing from both, with no live claim, for `grace_s` (far longer than a delivery
takes) is published again with its own id, priority and result setting. A copy of a job
that was not lost after all is harmless: the claim and the stored-result check keep one result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import message_task_id, queue_lists, task_id, waiting_messages
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.queue_registry import known_queues
from fluxfarm.shared.redis_conn import redis_now
from fluxfarm.shared.units import MIB
from fluxfarm.worker.serve.leases import JobClaims
from fluxfarm.worker.serve.retry_policy import backing_off

log = logging.getLogger(__name__)

MAX_SCANNED_MESSAGES = 20_000
"""Queues longer than this are not scanned (too costly a sweep); lost jobs are found as they drain."""
SCAN_CHUNK = 500
"""Messages read per round trip; only their ids are kept, so a sweep's memory is a chunk plus the ids."""
MAX_SCANNED_BYTES = 64 * MIB
MAX_SCAN_S = 10.0
"""A sweep that would read more than this, or take longer, gives up for its round (nothing is resent)."""


class LostJobSweeper:
    """`sweep_once` is run every `interval_s` by every worker (worker/serve/periodic.py); the lock lets one
    of them sweep per interval."""

    def __init__(
        self,
        client: redis.Redis,
        book: DatasetBook,
        resend: Callable[[SentJob], None],
        grace_s: float,
        interval_s: float,
        retention_s: float | None = None,
    ) -> None:
        """`retention_s`: finished datasets untouched this long leave the active index at each sweep
        (DatasetBook.retire_finished); None keeps them."""
        self._redis = client
        self._book = book
        self._resend = resend
        self._grace_s = grace_s
        self._interval_s = interval_s
        self._retention_s = retention_s

    def message_ids(self) -> set[str] | None:
        """Task ids of every job with a message in a queue or unacknowledged, or waiting out a back-off
        (worker/serve/retry_policy.py); None when the queues are too long, or reading them passes
        MAX_SCANNED_BYTES or MAX_SCAN_S.

        Lists are read in chunks while workers pop and producers push, so a chunk may repeat or miss a
        message that moved meanwhile; a job is resent only once it has been missing for `grace_s`, across
        sweeps, and a copy of a job that was not lost is harmless. `unacked` is read last, so a message
        taken from its list during the scan is found there."""
        queues = known_queues(self._redis)
        if sum(waiting_messages(self._redis, queues)) > MAX_SCANNED_MESSAGES:
            return None
        ids: set[str] = set()
        scanned = 0
        deadline = time.monotonic() + MAX_SCAN_S

        def keep(raws: list[bytes]) -> bool:
            nonlocal scanned
            scanned += sum(len(raw) for raw in raws)
            ids.update(task_id for raw in raws if (task_id := message_task_id(raw)) is not None)
            return scanned <= MAX_SCANNED_BYTES and time.monotonic() < deadline

        for name in (name for queue in queues for name in queue_lists(queue)):
            for start in range(0, MAX_SCANNED_MESSAGES, SCAN_CHUNK):
                raws = self._redis.lrange(name, start, start + SCAN_CHUNK - 1)
                if not keep(raws):
                    return None
                if len(raws) < SCAN_CHUNK:
                    break
        cursor = 0
        while True:
            cursor, entries = self._redis.hscan(keys.UNACKED, cursor, count=SCAN_CHUNK)
            if not keep(list(entries.values())):
                return None
            if cursor == 0:
                return ids | backing_off(self._redis)

    def sweep_once(self) -> list[str]:
        """One sweep (if no other worker swept within the interval); returns the ids sent again."""
        if not self._redis.set(keys.LOST_JOBS_LOCK, "1", nx=True, ex=max(1, int(self._interval_s))):
            return []
        if self._retention_s is not None and (retired := self._book.retire_finished(self._retention_s)):
            log.info("%d finished datasets left the active index: %s", len(retired), ", ".join(retired[:10]))
        present = self.message_ids()
        if present is None:
            return []
        now = redis_now(self._redis)
        seen = {key.decode(): float(value) for key, value in self._redis.hgetall(keys.LOST_JOBS_MISSING).items()}
        still_missing: dict[str, float] = {}
        resent: list[str] = []
        for dataset, waiting in self._book.waiting_by_dataset(self._book.names()).items():
            for job_id in sorted(waiting):
                if task_id(dataset, job_id) in present:
                    continue
                key = f"{dataset}/{job_id}"
                if self._redis.exists(JobClaims.key(dataset, job_id)):
                    continue  # a live worker is on it (a dead one's claim expires with its lease)
                since = seen.get(key, now)
                sent = self._book.sent_job(dataset, job_id)
                if sent is None:
                    continue  # published by a producer that kept no copy: nothing to send again
                if now - since < self._grace_s:
                    still_missing[key] = since
                    continue
                log.warning("job %s of %s has no message in Redis (lost in delivery); sent again", job_id, dataset)
                self._resend(sent)
                resent.append(job_id)
        with self._redis.pipeline() as pipe:
            pipe.delete(keys.LOST_JOBS_MISSING)
            if still_missing:
                pipe.hset(keys.LOST_JOBS_MISSING, mapping=still_missing)
            pipe.execute()
        return resent
