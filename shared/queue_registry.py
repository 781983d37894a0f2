"""The registry of queues made as jobs are sent (shared/routing.py): LoRA-set queues, tenant queues, and
the constraint queues of models other than FLUX.1 [dev].

Nobody can list these queues in advance as FLUX.1 [dev]'s constraint queues can be: a LoRA set's queue is
made by the first job of that set, a tenant's by the tenant's first job, a model's by its first job.
Every sender notes the queues it is about to publish to in one Redis hash, queue -> when a job was last
sent there, before it publishes; a queue new to the hash is announced on a channel, so workers take up a
new tenant's queue without a poll.
Workers read it to find LoRA jobs they can take and the tenant queues they consume, the lost-job sweeper
to look for messages there, and `fluxfarm status` and the exporter to show them.

An entry is forgotten once its queue has been empty and unsent to for `ADDED_QUEUE_IDLE_S` (and, for a
LoRA set's queue, unconsumed: its adopter leaves it when it empties). The check and the removal are one
script, so a sender that notes the queue again or a message that arrives meanwhile keeps it registered.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis
from redis.typing import EncodableT, FieldT

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import queue_lists
from fluxfarm.shared.redis_conn import text
from fluxfarm.shared.routing import added_queue, all_queues, split_tenant_queue

ADDED_QUEUE_IDLE_S = 3600.0
"""A LoRA or tenant queue unused this long leaves the registry (a sender notes it again before its next job)."""

_FORGET_IF_IDLE = """
-- KEYS[1]: the registry; KEYS[2..]: the queue's lists. ARGV[1]: the queue; ARGV[2]: its time as read.
local sent = redis.call('HGET', KEYS[1], ARGV[1])
if not sent or tonumber(sent) ~= tonumber(ARGV[2]) then return 0 end
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return 0 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


def note_queues(client: redis.Redis, queues: Iterable[str]) -> None:
    """Record that jobs are about to be sent to `queues` (constraint queues, always known, are skipped)."""
    now = time.time()
    entries: dict[FieldT, EncodableT] = {queue: now for queue in set(queues) if added_queue(queue)}
    if entries and client.hset(keys.ADDED_QUEUES, mapping=entries):  # the count of fields new to the hash
        client.publish(keys.QUEUE_ADDED_CHANNEL, "1")


class QueueNews:
    """Waits for news of a queue added to the registry (a worker's tenant-queue duty): `wait` returns at the
    first announcement or after its timeout, whichever comes first. A lost announcement (a reconnect in
    between) costs one timeout, never the queue: the caller reads the registry after each wait."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    def wait(self, timeout_s: float) -> None:
        try:
            if not self._pubsub.subscribed:
                self._pubsub.subscribe(keys.QUEUE_ADDED_CHANNEL)
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=left) is not None:
                    return
        except redis.RedisError:
            time.sleep(timeout_s)  # Redis is away: the registry read after this says so, once a timeout

    def close(self) -> None:
        self._pubsub.close()


def registered_queues(client: redis.Redis) -> dict[str, float]:
    """Registered LoRA and tenant queues and when a job was last sent to each. An entry that is not a
    well-formed queue name (written by a hand or a client of another version) is left out."""
    entries = {text(name): sent for name, sent in client.hgetall(keys.ADDED_QUEUES).items()}
    found: dict[str, float] = {}
    for name, sent in entries.items():
        try:
            found[name] = float(sent)
        except ValueError:
            continue
    return {name: sent for name, sent in found.items() if added_queue(name)}


def known_queues(client: redis.Redis) -> list[str]:
    """Every render queue there is: the constraint queues and the registered LoRA and tenant queues."""
    return all_queues() + sorted(registered_queues(client))


def forget_idle_queues(
    client: redis.Redis, registered: dict[str, float], consumed: set[str], idle_s: float = ADDED_QUEUE_IDLE_S
) -> list[str]:
    """Drop the entries of `registered` (as `registered_queues` read them) whose queues are empty and not
    sent to for `idle_s`, and for a LoRA set's queue consumed by no live worker (`consumed`): every worker
    consumes the tenant queues its level serves, and leaves one when it leaves the registry. Returns them."""
    now = time.time()
    stale = [
        name
        for name, sent in registered.items()
        if now - sent > idle_s and (name not in consumed or split_tenant_queue(name)[1] is not None)
    ]
    forget = client.register_script(_FORGET_IF_IDLE)
    return [
        name
        for name in stale
        if forget(keys=[keys.ADDED_QUEUES, *queue_lists(name)], args=[name, repr(registered[name])], client=client)
    ]
