"""Which queues a worker consumes: its level's constraint queues, or one LoRA set's queue alone.

Jobs with LoRAs wait in their set's queue (shared/routing.py, registered in shared/lora_queues.py).
Switching a worker's weights between LoRA sets costs seconds (unfuse, then fuse again, from the disk
cache at best: 8.7 s for a rank-64 set at Q8_0 on an H200), so a fleet must not pass sets around:
- A worker that adopts a set's queue consumes that queue alone, until it is empty. It never mixes
  those jobs with base jobs or another set's, so it fuses once per stint.
- An orphaned queue (jobs waiting, no live consumer) is adopted at once by the worker that carries its
  set, or by any worker whose level fits when no live worker carries it. Where another worker carries
  it (its heartbeat says so), the others wait `grace_s`: the carrier gets the first chance, and no set
  waits long for a worker.
- A worker with nothing waiting in its own queues joins the set queue with the most jobs per
  consumer, so that a large LoRA dataset spreads over idle workers.
- Otherwise, and when its set's queue has emptied, the worker goes back to its constraint queues.
A lock per queue in Redis lets one worker adopt it at a time, until the heartbeats show the adopter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis

from fluxfarm.shared.celery_app import waiting_messages
from fluxfarm.shared.fleet import HEARTBEAT_INTERVAL_S, read_workers
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.lora_queues import forget_idle_lora_queues, lora_queues
from fluxfarm.shared.routing import level_serves, queues_for_level, split_lora_queue

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = HEARTBEAT_INTERVAL_S
ADOPT_LOCK_PREFIX = "fluxfarm:lora-adopt:"
ADOPT_LOCK_S = 3 * HEARTBEAT_INTERVAL_S + CHECK_INTERVAL_S
"""Long enough for the adopter's next heartbeat to name the queue: then others see it consumed."""


class LoraAdoption:
    """The queues a worker consumes; `tick()` runs every CHECK_INTERVAL_S and changes them through
    `change(added, cancelled)` (Celery's add_consumer / cancel_consumer addressed to this worker)."""

    def __init__(
        self,
        client: redis.Redis,
        node: str,
        level: QuantLevel,
        carried: Callable[[], str | None],
        change: Callable[[list[str], list[str]], None],
        grace_s: float = 3 * CHECK_INTERVAL_S,
    ) -> None:
        self._redis = client
        self._node = node
        self._carried = carried
        self._change = change
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._orphaned_since: dict[str, float] = {}
        self.level = level
        self.lora_queue: str | None = None
        self.queues: list[str] = queues_for_level(level)
        """The queues consumed now (the heartbeat reports them)."""

    def set_level(self, level: QuantLevel) -> None:
        """After a step down: the new level's constraint queues; a set queue it cannot serve is left."""
        with self._lock:
            self.level = level
            if self.lora_queue is not None and not level_serves(level, self.lora_queue):
                self.lora_queue = None
            self._apply()

    def tick(self) -> None:
        with self._lock:
            registered = lora_queues(self._redis)
            if not registered and self.lora_queue is None:
                return  # a farm without LoRA jobs pays one read of an empty hash a tick, not a scan of the fleet
            workers = [w for w in read_workers(self._redis) if w.node != self._node]
            consumed = {queue for w in workers for queue in w.queues} | set(self.queues)
            forgotten = forget_idle_lora_queues(self._redis, registered, consumed)
            fitting = [q for q in registered if q not in forgotten and level_serves(self.level, q)]
            if not fitting and self.lora_queue is None:
                return
            names = sorted(set(fitting) | ({self.lora_queue} if self.lora_queue else set()))
            base = queues_for_level(self.level)
            counts = waiting_messages(self._redis, names + base)
            waiting = dict(zip(names, counts, strict=False))
            if self.lora_queue is not None and waiting[self.lora_queue] > 0:
                return  # a stint lasts until the set's queue is empty
            consumers = Counter(queue for w in workers for queue in w.queues)
            carried_elsewhere = {w.lora_set for w in workers if w.lora_set is not None}
            target = self._choose(waiting, consumers, carried_elsewhere, idle=sum(counts[len(names) :]) == 0)
            if target != self.lora_queue:
                log.info("LoRA queue: %s -> %s", self.lora_queue or "none", target or "none (constraint queues)")
                self.lora_queue = target
                self._apply()

    def _choose(
        self, waiting: dict[str, int], consumers: Counter[str], carried_elsewhere: set[str], idle: bool
    ) -> str | None:
        carried = self._carried()
        now = time.monotonic()
        orphans = [q for q, n in waiting.items() if n > 0 and consumers[q] == 0 and q != self.lora_queue]
        self._orphaned_since = {q: self._orphaned_since.get(q, now) for q in orphans}
        ready = [
            q
            for q in orphans
            if split_lora_queue(q)[1] == carried
            or split_lora_queue(q)[1] not in carried_elsewhere
            or now - self._orphaned_since[q] >= self._grace_s
        ]
        ready.sort(key=lambda q: (split_lora_queue(q)[1] != carried, -waiting[q]))
        if idle:  # help with a queue that has more jobs than consumers
            crowded = [q for q, n in waiting.items() if n > consumers[q] > 0 and q != self.lora_queue]
            ready += sorted(crowded, key=lambda q: (split_lora_queue(q)[1] != carried, -waiting[q] / consumers[q]))
        for queue in ready:
            if self._redis.set(ADOPT_LOCK_PREFIX + queue, self._node, nx=True, ex=int(ADOPT_LOCK_S)):
                self._orphaned_since.pop(queue, None)
                return queue
        return None

    def _apply(self) -> None:
        wanted = [self.lora_queue] if self.lora_queue is not None else queues_for_level(self.level)
        added = [q for q in wanted if q not in self.queues]
        cancelled = [q for q in self.queues if q not in wanted]
        self.queues = wanted  # before `change`, which logs them
        if added or cancelled:
            self._change(added, cancelled)
