"""What each gateway token has in the farm and has used: the datasets it submitted to, the jobs it
sent, and its `max_queued` quota, checked against its datasets' queued and running jobs."""

from __future__ import annotations

from collections import Counter

import redis

from fluxfarm.producer.gateway.tokens import TokenRecord, TokenUse
from fluxfarm.shared import keys
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import QuotaExceeded
from fluxfarm.shared.redis_conn import text


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

    def check_room(self, record: TokenRecord, adding: int) -> None:
        """QuotaExceeded (the gateway's 429) when `adding` more jobs would pass the token's `max_queued`."""
        limit = record.grant.max_queued
        if limit is None:
            return
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
