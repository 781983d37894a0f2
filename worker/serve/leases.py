"""Leases: a live worker keeps its jobs; a dead worker's jobs go back to the queue within a lease.

Two kinds of lease, both renewed by one thread every `lease_s / 6`:
- message leases: kombu's Redis transport keeps each unacked message in `unacked_index` scored with
  its delivery time and puts it back on its queue once the score is older than the visibility
  timeout (shared/celery_app.py sets that timeout to `lease_s`). Renewing the score of every message
  this worker holds means a render may take hours, yet a SIGKILLed worker's messages are back on the
  queue about `lease_s` after its last renewal.
- job claims: `fluxfarm:claim:<dataset>:<job_id>` names the process rendering a job. A duplicate
  delivery (a redelivery racing a slow worker, a resubmit) finds the claim and waits for the stored
  result instead of rendering the job a second time; a claim whose holder died expires with its lease.

Scores are the workers' own clocks (kombu writes them that way), so hosts must keep their clocks in
step (NTP) to well within a lease.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import redis

from fluxfarm.shared import keys

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    renewed = renewed + 1
  end
end
return renewed
"""
"""Compare-and-act in one step: a claim that lapsed and was taken by another worker stays theirs."""


class InFlight:
    """Task ids whose task body is running in this process now. Celery's own request sets keep a
    request whose message can no longer be acknowledged (after a broker connection loss) even once
    its task has ended; renewing that message's lease would keep it from ever being redelivered."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, task_id: str) -> Iterator[None]:
        with self._lock:
            self._counts[task_id] = self._counts.get(task_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._counts.pop(task_id) - 1
                if left:
                    self._counts[task_id] = left

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._counts)


def held_delivery_tags(in_flight: InFlight) -> list[str]:
    """Delivery tags of the messages whose tasks this process is running now."""
    from celery.worker import state

    running = in_flight.ids()
    for _ in range(3):  # the sets are weak and change under us; a retry sees a settled copy
        try:
            requests = [*state.reserved_requests, *state.active_requests]
            tags = {str(r.message.delivery_tag) for r in requests if r.id in running}
            return sorted(tag for tag in tags if tag != "None")
        except RuntimeError:
            continue
    return []


class JobClaims:
    """Which process renders which job, as leases in Redis; `owner` is unique to this process."""

    def __init__(self, client: redis.Redis, node: str, lease_s: float) -> None:
        self._redis = client
        self.owner = f"{node}/{uuid.uuid4().hex[:12]}"
        self.lease_ms = int(lease_s * 1000)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @staticmethod
    def key(dataset: str, job_id: str) -> str:
        return keys.claim(dataset, job_id)

    def try_claim(self, dataset: str, job_id: str) -> bool:
        """Take the job's claim if nobody holds it."""
        key = self.key(dataset, job_id)
        if not self._redis.set(key, self.owner, nx=True, px=self.lease_ms):
            return False
        with self._lock:
            self._held.add(key)
        return True

    def holder(self, dataset: str, job_id: str) -> str | None:
        value = self._redis.get(self.key(dataset, job_id))
        return value.decode() if value is not None else None

    def holds(self, dataset: str, job_id: str) -> bool:
        with self._lock:
            return self.key(dataset, job_id) in self._held

    def forget(self, dataset: str, job_id: str) -> None:
        """The claim was released elsewhere (by the script that records the job done): stop renewing it."""
        with self._lock:
            self._held.discard(self.key(dataset, job_id))

    def release(self, dataset: str, job_id: str) -> None:
        """Give the claim up, unless it is no longer held here (released as the job was recorded done)."""
        key = self.key(dataset, job_id)
        with self._lock:
            if key not in self._held:
                return
            self._held.discard(key)
        self._release(keys=[key], args=[self.owner])

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def renew(self, claims: Iterable[str]) -> int:
        """Extend the claims (their keys) this worker holds; returns how many it still held."""
        held = list(claims)
        return int(self._renew(keys=held, args=[self.owner, self.lease_ms])) if held else 0


class LeaseKeeper:
    """Renews this worker's message leases and job claims; `worker/serve/periodic.py` runs it every
    `lease_s / 6` (a lease has six beats before it lapses)."""

    def __init__(self, client: redis.Redis, claims: JobClaims, in_flight: InFlight) -> None:
        self._redis = client
        self._claims = claims
        self._in_flight = in_flight

    def renew_once(self) -> tuple[int, int]:
        """Renew now; returns (messages, claims) renewed."""
        tags = held_delivery_tags(self._in_flight)
        messages = 0
        if tags:
            # XX: only tags still unacked; an ack between our read and this write stays an ack.
            messages = int(self._redis.zadd(keys.UNACKED_INDEX, dict.fromkeys(tags, time.time()), xx=True, ch=True))
        return messages, self._claims.renew(self._claims.held())
