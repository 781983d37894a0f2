"""The registry of LoRA-set queues: which exist, for the workers that adopt them and the reports.

A LoRA set's queue (shared/routing.py) is made by the first job sent to it, so nobody can list these
queues in advance as they can the constraint queues. Every sender notes the queues it is about to
publish to in one Redis hash, queue -> when a job was last sent there, before it publishes. Workers
read it to find LoRA jobs they can take, the lost-job sweeper to look for messages there, and
`fluxfarm status` and the exporter to show them. An entry is forgotten once its queue has been empty,
unconsumed and unsent to for `LORA_QUEUE_IDLE_S`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis
from redis.typing import EncodableT, FieldT

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import waiting_messages
from fluxfarm.shared.redis_conn import text
from fluxfarm.shared.routing import all_queues, split_lora_queue

LORA_QUEUE_IDLE_S = 3600.0
"""A LoRA queue unused this long leaves the registry (a sender notes it again before its next job)."""


def note_lora_queues(client: redis.Redis, queues: Iterable[str]) -> None:
    """Record that jobs are about to be sent to `queues` (those without a LoRA set are skipped)."""
    now = time.time()
    entries: dict[FieldT, EncodableT] = {queue: now for queue in set(queues) if split_lora_queue(queue)[1] is not None}
    if entries:
        client.hset(keys.LORA_QUEUES, mapping=entries)


def lora_queues(client: redis.Redis) -> dict[str, float]:
    """Registered LoRA queues and when a job was last sent to each."""
    return {text(name): float(sent) for name, sent in client.hgetall(keys.LORA_QUEUES).items()}


def known_queues(client: redis.Redis) -> list[str]:
    """Every render queue there is: the constraint queues and the registered LoRA queues."""
    return all_queues() + sorted(lora_queues(client))


def forget_idle_lora_queues(
    client: redis.Redis, registered: dict[str, float], consumed: set[str], idle_s: float = LORA_QUEUE_IDLE_S
) -> list[str]:
    """Drop the entries of `registered` (as `lora_queues` read them) whose queues are empty, consumed by no
    live worker (`consumed`) and not sent to for `idle_s`; returns them."""
    now = time.time()
    stale = [name for name, sent in registered.items() if now - sent > idle_s and name not in consumed]
    idle = [name for name, waiting in zip(stale, waiting_messages(client, stale), strict=True) if waiting == 0]
    if idle:
        client.hdel(keys.LORA_QUEUES, *idle)
    return idle
