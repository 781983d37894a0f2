"""What each gateway token has in the farm and has used: the datasets it submitted to, the jobs it
sent, and its `max_queued` quota, checked against its datasets' queued and running jobs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
from redis.exceptions import LockError

from fluxfarm.producer.gateway.tokens import TokenRecord, TokenUse
from fluxfarm.shared import keys
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import QuotaExceeded
from fluxfarm.shared.redis_conn import text

SUBMIT_LOCK_S = 600
"""A submit holding its token's lock longer (a crashed gateway) loses it: the quota is then checked
loosely once, never blocked for good. A million-row upload enqueues in about three minutes."""
SUBMIT_WAIT_S = 30
"""How long a request waits for another submit of the same token before it is answered 429."""


class TokenUsage:
    """Per-token bookkeeping in the farm's Redis (shared/keys.py: token_datasets, token_usage)."""

    def __init__(self, client: redis.Redis, book: DatasetBook) -> None:
        self._redis = client
        self._book = book

    def datasets(self, name: str) -> list[str]:
        return sorted(text(member) for member in self._redis.smembers(keys.token_datasets(name)))

    def in_flight(self, name: str) -> int:
        """The token's jobs queued or running now, over the datasets it submitted to."""
        return self._book.in_flight(self.datasets(name))

    @contextmanager
    def room_for(self, record: TokenRecord, adding: int) -> Iterator[None]:
        """Hold the token's room for `adding` more jobs while the caller sends them: QuotaExceeded (the
        gateway's 429) when they would pass its `max_queued`. A token with a quota submits one request at
        a time (a lock in Redis, so gateways side by side agree); a token without one is not held."""
        if record.grant.max_queued is None:
            yield
            return
        lock = self._redis.lock(
            keys.token_submit_lock(record.name), timeout=SUBMIT_LOCK_S, blocking_timeout=SUBMIT_WAIT_S
        )
        if not lock.acquire():
            raise QuotaExceeded(f"token {record.name}: another submit of this token is still running; try again")
        try:
            self._check_room(record, adding)
            yield
        finally:
            with suppress(LockError):  # held past SUBMIT_LOCK_S and taken over: the other holder releases its own
                lock.release()

    def _check_room(self, record: TokenRecord, adding: int) -> None:
        limit = record.grant.max_queued
        assert limit is not None
        waiting = self.in_flight(record.name)
        if waiting + adding > limit:
            raise QuotaExceeded(
                f"token {record.name}: max_queued {limit} exceeded: {waiting} queued or running, this request "
                f"adds up to {adding}"
            )

    def note_submitted(self, name: str, per_dataset: Counter[str], enqueued: int) -> None:
        with self._redis.pipeline(transaction=False) as pipe:
            if per_dataset:
                pipe.sadd(keys.token_datasets(name), *per_dataset)
            pipe.hincrby(keys.token_usage(name), "jobs", enqueued)
            pipe.execute()

    def usage(self, name: str) -> TokenUse:
        """What the token sent, and what the farm rendered of its datasets (a dataset two tokens share
        counts for both)."""
        sent = {text(k): int(v) for k, v in self._redis.hgetall(keys.token_usage(name)).items()}
        images, gpu_s = self._book.usage(self.datasets(name))
        return TokenUse(token=name, jobs_submitted=sent.get("jobs", 0), images=images, gpu_seconds=gpu_s)
