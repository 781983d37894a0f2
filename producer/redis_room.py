"""Admission control: a submit stops before Redis' maxmemory with a clear message, not a traceback and a
half-written dataset.

Managed Redis services, and the compose file, run with `maxmemory` and `noeviction`: past the line every
write is refused, the producers' and the workers' alike. Before each chunk of a stream the producer reads
`INFO memory` (`used_memory`, `maxmemory`, or FLUXFARM_REDIS_MAXMEMORY_MIB where Redis has none), keeps
FLUXFARM_REDIS_RESERVE_SHARE of the limit for the workers' bookkeeping (claims, leases, done records),
and sends only what fits at the farm's bytes per queued job, measured as it goes.
"""

from __future__ import annotations

import redis
from pydantic import BaseModel, ConfigDict

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import queue_footprint, waiting_messages
from fluxfarm.shared.datasets import DatasetBook, DatasetRecord
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.fleet import QueueStatus
from fluxfarm.shared.queue_registry import known_queues
from fluxfarm.shared.units import MIB

FOOTPRINT_SAMPLE_DATASETS = 100
"""The busiest datasets whose records `sampled` measures (MEMORY USAGE, 3 commands each): 20,000 of them cost
`fluxfarm status` 0.3 s for the same figure."""
FIRST_GUESS_BYTES_PER_JOB = 4096.0
"""Before the stream's first chunk is measured: above the 2.1-2.6 KB a plain or ControlNet job costs
(docs/benchmarks.md, the control plane)."""


class RedisFull(FarmError):
    """Redis has no room under its maxmemory for the jobs being submitted.

    `drains`: whether anything is queued or running whose end frees room (a job's done record is smaller
    than its queued message and record). False: the room is taken by what stays (done records, other keys),
    waiting cannot bring it back, and a producer that waits for room must stop rather than wait for ever."""

    def __init__(self, message: str, drains: bool = True) -> None:
        super().__init__(message)
        self.drains = drains


class Room(BaseModel):
    """Redis' memory at one moment, and what it means in jobs."""

    model_config = ConfigDict(frozen=True)

    used_bytes: int
    limit_bytes: int | None
    """maxmemory (or the setting standing in for it); None: no limit to keep to."""
    reserve_bytes: int
    bytes_per_job: float
    measured: bool = False
    """bytes_per_job was sampled from what the queues and dataset records hold (`RedisRoom.sampled`), not
    the first guess or a submit's running estimate."""

    @property
    def used_share(self) -> float | None:
        """used / limit (None: no limit)."""
        return self.used_bytes / self.limit_bytes if self.limit_bytes else None

    @property
    def jobs(self) -> int | None:
        """How many more jobs fit (None: no limit)."""
        if self.limit_bytes is None:
            return None
        return max(0, int((self.limit_bytes - self.reserve_bytes - self.used_bytes) // self.bytes_per_job))

    def describe(self) -> str:
        assert self.limit_bytes is not None
        return (
            f"Redis holds {self.used_bytes / MIB:.1f} of its {self.limit_bytes / MIB:.1f} MiB maxmemory, "
            f"{self.reserve_bytes / MIB:.1f} MiB kept for the workers, ~{self.bytes_per_job:.0f} bytes a queued job"
        )


class RedisRoom:
    """What one stream of submits may still send; `measured` learns the bytes per job from each chunk."""

    def __init__(self, client: redis.Redis, maxmemory_mib: float | None, reserve_share: float) -> None:
        self._redis = client
        self._fallback = int(maxmemory_mib * MIB) if maxmemory_mib else None
        self._reserve_share = reserve_share
        self.bytes_per_job = FIRST_GUESS_BYTES_PER_JOB

    @classmethod
    def of(cls, client: redis.Redis, settings: ProducerSettings) -> RedisRoom:
        return cls(client, settings.redis_maxmemory_mib, settings.redis_reserve_share)

    def now(self) -> Room:
        memory = self._redis.info("memory")
        limit = int(memory.get("maxmemory", 0)) or self._fallback
        reserve = int(limit * self._reserve_share) if limit else 0
        return Room(
            used_bytes=int(memory["used_memory"]),
            limit_bytes=limit,
            reserve_bytes=reserve,
            bytes_per_job=self.bytes_per_job,
        )

    def drains(self) -> bool:
        """Whether any job is queued or running, in any active dataset or any render queue: what a fleet
        drains to free room. Asked only while full, so its cost (a round trip for the queues, one for the
        datasets) is not paid per chunk."""
        if any(waiting_messages(self._redis, known_queues(self._redis))):
            return True
        book = DatasetBook(self._redis)
        return book.in_flight(book.names()) > 0

    def measured(self, before: Room, jobs: int) -> None:
        """After `jobs` were sent: the bytes they took (never below a tenth of the first guess, so a chunk
        sent while workers freed memory does not make the next look free)."""
        if jobs <= 0:
            return
        taken = (int(self._redis.info("memory")["used_memory"]) - before.used_bytes) / jobs
        self.bytes_per_job = max(taken, FIRST_GUESS_BYTES_PER_JOB / 10, self.bytes_per_job * 0.5)

    def sampled(self, queues: list[QueueStatus], datasets: list[DatasetRecord]) -> Room:
        """Now, with the bytes a queued job takes sampled (MEMORY USAGE) from the queues' messages and the
        dataset records of queued and running jobs: what the exporter and `fluxfarm status` show, so an
        operator can tell how many jobs a million more would cost. The first guess while nothing waits."""
        room = self.now()
        waiting = sum(queue.waiting for queue in queues)
        recorded = sum(record.queued + record.running for record in datasets)
        if not (waiting and recorded):
            return room
        message_bytes = queue_footprint(self._redis, [queue.name for queue in queues if queue.waiting])
        busy = [record for record in datasets if record.queued or record.running]
        busiest = sorted(busy, key=lambda record: record.queued + record.running, reverse=True)
        sample = busiest[:FOOTPRINT_SAMPLE_DATASETS]
        record_bytes = DatasetBook(self._redis).queued_footprint([record.name for record in sample])
        per_job = message_bytes / waiting + record_bytes / sum(record.queued + record.running for record in sample)
        return room.model_copy(update={"bytes_per_job": per_job, "measured": True})
