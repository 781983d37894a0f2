"""Which queues a worker consumes: its level's constraint and tenant queues, or one LoRA set's queue alone.

Tenant queues (shared/routing.py) are made as tenants send jobs and registered in shared/queue_registry.py;
every worker consumes each one its level serves as soon as its registration is announced (or within
TENANT_CHECK_INTERVAL_S, should the news be lost), so kombu's rotation over a worker's queues interleaves
the tenants' jobs.

Jobs with LoRAs wait in their set's queue (shared/routing.py, registered in shared/queue_registry.py).
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

Sets share the fleet with base jobs fairly (three one-job sets once took all three workers off 500
high-priority base jobs):
- while the worker's base queues hold jobs, it adopts a set only if the set's most urgent job is more
  urgent than theirs, or as urgent and the workers on sets stay within `FLUXFARM_LORA_FLEET_SHARE`
  of the live fleet (at least one);
- a stint ends after `FLUXFARM_LORA_STINT_MAX_S` when base jobs as urgent as the set's wait; the set's
  queue is then orphaned and adopted again under the same rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import most_urgent, waiting_by_priority
from fluxfarm.shared.fleet import HEARTBEAT_INTERVAL_S, read_workers
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.queue_registry import forget_idle_queues, registered_queues
from fluxfarm.shared.routing import queues_for_level, serves, split_lora_queue, split_tenant_queue

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = HEARTBEAT_INTERVAL_S
TENANT_CHECK_INTERVAL_S = 10.0
"""How often a worker reads the registry for tenant queues when no news of one comes (QueueNews): a fallback
for news lost in a reconnect. News is what takes a new queue up at once; reading every second cost each idle
worker a registry read a second, a fifth of its Redis commands (docs/scale.md)."""
ADOPT_LOCK_S = 3 * HEARTBEAT_INTERVAL_S + CHECK_INTERVAL_S
"""Long enough for the adopter's next heartbeat to name the queue: then others see it consumed."""


class QueueAdoption:
    """The queues a worker consumes, changed through `change(added, cancelled)` (Celery's add_consumer /
    cancel_consumer addressed to this worker): `follow_tenants()` adds and drops tenant queues as they
    come and go, `tick()` adopts and leaves LoRA set queues."""

    def __init__(
        self,
        client: redis.Redis,
        node: str,
        model: FluxModel,
        level: QuantLevel,
        carried: Callable[[], str | None],
        change: Callable[[list[str], list[str]], None],
        grace_s: float = 3 * CHECK_INTERVAL_S,
        fleet_share: float = 0.5,
        stint_max_s: float = 900.0,
    ) -> None:
        self._redis = client
        self._node = node
        self._carried = carried
        self._change = change
        self._grace_s = grace_s
        self._fleet_share = fleet_share
        self._stint_max_s = stint_max_s
        self._stint_started = 0.0
        self._rest_until = 0.0
        """After a stint ended at its cap, sets no more urgent than the base jobs wait until then."""
        self._lock = threading.Lock()
        self._orphaned_since: dict[str, float] = {}
        self.model = model
        self.level = level
        self.lora_queue: str | None = None
        self._tenant_queues = sorted(q for q in registered_queues(client) if split_tenant_queue(q)[1] is not None)
        """Every registered tenant queue (those the level serves are consumed beside the constraint queues)."""
        self.queues: list[str] = self._base_queues()
        """The queues consumed now (the heartbeat reports them)."""

    def set_level(self, level: QuantLevel) -> None:
        """After a step down: the new level's constraint queues; a set queue it cannot serve is left."""
        with self._lock:
            self.level = level
            if self.lora_queue is not None and not serves(self.model, level, self.lora_queue):
                self.lora_queue = None
            self._apply()

    def follow_tenants(self) -> None:
        """Consume the tenant queues registered now (on news of one, and every TENANT_CHECK_INTERVAL_S), and
        forget those idle for an hour (empty and unsent to)."""
        with self._lock:
            registered = registered_queues(self._redis)
            tenants = {q: sent for q, sent in registered.items() if split_tenant_queue(q)[1] is not None}
            forgotten = forget_idle_queues(self._redis, tenants, set())
            self._tenant_queues = sorted(q for q in tenants if q not in forgotten)
            if self.lora_queue is None:
                self._apply()

    def tick(self) -> None:
        """Adopt or leave a LoRA set's queue (every CHECK_INTERVAL_S, on workers that take LoRA jobs)."""
        with self._lock:
            registered = registered_queues(self._redis)
            sets = {q: sent for q, sent in registered.items() if split_lora_queue(q)[1] is not None}
            if not sets and self.lora_queue is None:
                return  # a farm without LoRA jobs pays one read of a small hash a tick, not a scan of the fleet
            workers = [w for w in read_workers(self._redis) if w.node != self._node]
            consumed = {queue for w in workers for queue in w.queues} | set(self.queues)
            forgotten = forget_idle_queues(self._redis, sets, consumed)
            fitting = [q for q in sets if q not in forgotten and serves(self.model, self.level, q)]
            if not fitting and self.lora_queue is None:
                return
            names = sorted(set(fitting) | ({self.lora_queue} if self.lora_queue else set()))
            base = self._base_queues()
            by_step = waiting_by_priority(self._redis, names + base)
            urgency = {name: most_urgent(counts) for name, counts in zip(names, by_step, strict=False)}
            waiting = {name: sum(counts) for name, counts in zip(names, by_step, strict=False)}
            base_urgency = min(
                (u for counts in by_step[len(names) :] if (u := most_urgent(counts)) is not None), default=None
            )
            if self.lora_queue is not None and waiting[self.lora_queue] > 0:
                if self._stint_over(urgency[self.lora_queue], base_urgency):
                    self._end_stint()
                return  # otherwise a stint lasts until the set's queue is empty
            consumers = Counter(queue for w in workers for queue in w.queues)
            carried_elsewhere = {w.lora_set for w in workers if w.lora_set is not None}
            on_sets = sum(1 for w in workers if any(split_lora_queue(q)[1] for q in w.queues))
            room = (
                on_sets < max(1, int(self._fleet_share * (len(workers) + 1))) and time.monotonic() >= self._rest_until
            )

            def may_adopt(queue: str) -> bool:
                """Base jobs waiting for this worker keep it unless the set's are more urgent, or as urgent
                and sets hold less than their share of the fleet (and this worker's last stint did not
                just end at its cap)."""
                set_urgency = urgency[queue]
                if base_urgency is None or set_urgency is None:
                    return True
                return set_urgency < base_urgency or (set_urgency == base_urgency and room)

            allowed = {name: count for name, count in waiting.items() if may_adopt(name)}
            target = self._choose(allowed, consumers, carried_elsewhere, idle=base_urgency is None)
            if target != self.lora_queue:
                log.info("LoRA queue: %s -> %s", self.lora_queue or "none", target or "none (constraint queues)")
                self.lora_queue = target
                self._stint_started = time.monotonic()
                self._apply()

    def _stint_over(self, set_urgency: int | None, base_urgency: int | None) -> bool:
        """True once the stint has run `stint_max_s` and base jobs at least as urgent as the set's wait."""
        if time.monotonic() - self._stint_started < self._stint_max_s or base_urgency is None:
            return False
        return set_urgency is None or base_urgency <= set_urgency

    def _end_stint(self) -> None:
        """Leave the set's queue for the base queues, and rest from equally urgent sets for a stint."""
        log.info(
            "LoRA queue %s: stint past %.0fs with base jobs waiting; back to them", self.lora_queue, self._stint_max_s
        )
        self.lora_queue = None
        self._rest_until = time.monotonic() + self._stint_max_s
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
            if self._redis.set(keys.lora_adopt_lock(queue), self._node, nx=True, ex=int(ADOPT_LOCK_S)):
                self._orphaned_since.pop(queue, None)
                return queue
        return None

    def _base_queues(self) -> list[str]:
        """The queues consumed off a LoRA stint: the level's constraint queues and the tenant queues it serves."""
        return queues_for_level(self.level, self.model) + [
            q for q in self._tenant_queues if serves(self.model, self.level, q)
        ]

    def _apply(self) -> None:
        wanted = [self.lora_queue] if self.lora_queue is not None else self._base_queues()
        added = [q for q in wanted if q not in self.queues]
        cancelled = [q for q in self.queues if q not in wanted]
        self.queues = wanted  # before `change`, which logs them
        if added or cancelled:
            self._change(added, cancelled)
