"""The live fleet as Redis sees it: worker heartbeats and queue depths, and the jobs nobody can serve.

Each worker keeps a key `fluxfarm:worker:<node>` alive (TTL a few heartbeats long) holding what it
is and what it serves. A worker that dies stops refreshing it and vanishes within the TTL, so a
queue whose only consumers died shows as unserved instead of silently stuck.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import waiting_messages
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import LEGACY_MODEL, FluxModel
from fluxfarm.shared.queue_registry import known_queues
from fluxfarm.shared.routing import constraint_of_queue, parse_queue, serves, split_lora_queue

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 8
"""A worker silent this long counts as gone: fleet status is at most this stale."""


class WorkerStatus(BaseModel):
    """What a worker publishes about itself on every heartbeat."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node: str
    hostname: str
    device: str
    gpu_name: str | None
    vram_gib: float | None
    level: QuantLevel
    """A level this version does not know makes the whole status unreadable: that worker is of another
    version, and fleet readers skip it as they skip every status they cannot read."""
    model: str
    """The pipeline it loaded: a Hub repo or a folder."""
    flux_model: FluxModel = LEGACY_MODEL
    """The catalog model it serves (shared/models.py): the queues it consumes are that model's."""
    queues: list[str]
    started_at: datetime
    last_seen: datetime
    jobs_done: int = 0
    jobs_failed: int = 0
    images_rendered: int = 0
    """Rendered and stored by this worker (jobs_done also counts jobs found already stored)."""
    images_per_hour: float | None = None
    """Rendered over the last few minutes (shared.rates), idle time included; None before the first image."""
    busy_images_per_hour: float | None = None
    """The same renders over the GPU seconds they took: what the card sustains while fed (the fleet planner's live
    rate); None before the first image, and from workers older than this field."""
    current_job: str | None = None
    compute_capability: str | None = None
    """CUDA compute capability (`8.6`, `9.0`); None on a CPU worker."""
    vram_budget_gib: float | None = None
    """FLUXFARM_VRAM_BUDGET_GIB, when the worker is capped below its card."""
    vram_peak_gib: float | None = None
    """Peak GPU memory torch allocated since the worker started."""
    torch_version: str | None = None
    metrics_url: str | None = None
    """Where Prometheus scrapes this worker; None with metrics off."""
    lora_set: str | None = None
    """The LoRA set fused into its weights (shared.adapters.lora_set_id); None: the base weights."""


class QueueStatus(BaseModel):
    name: str
    waiting: int
    consumers: list[str]
    adopters: list[str] = []
    """For a LoRA set's queue: the live workers whose level lets them adopt it (worker/serve/queue_adoption.py)."""

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form for mypy
    @property
    def constraint(self) -> str:
        """`render.exact.q8_0` -> `exact:Q8_0`, for people."""
        return str(constraint_of_queue(self.name))

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form for mypy
    @property
    def model(self) -> str:
        """The model whose jobs wait there (`flux.2-klein-4b`)."""
        parsed = parse_queue(self.name)
        return (parsed.model if parsed is not None else LEGACY_MODEL).value

    @property
    def needs(self) -> str:
        """What a worker must hold to serve it, for people: `exact:Q8_0`, or `flux.2-dev at auto`."""
        return self.constraint if self.model == LEGACY_MODEL else f"{self.model} at {self.constraint}"

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form for mypy
    @property
    def unserved(self) -> bool:
        return self.waiting > 0 and not self.consumers and not self.adopters


class FleetReport(BaseModel):
    checked_at: datetime
    workers: list[WorkerStatus]
    queues: list[QueueStatus]

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form for mypy
    @property
    def unserved(self) -> list[QueueStatus]:
        return [queue for queue in self.queues if queue.unserved]


def publish_heartbeat(client: redis.Redis, status: WorkerStatus) -> None:
    client.set(keys.worker(status.node), status.model_dump_json(), ex=HEARTBEAT_TTL_S)


def remove_worker(client: redis.Redis, node: str) -> None:
    client.delete(keys.worker(node))


def read_workers(client: redis.Redis) -> list[WorkerStatus]:
    names = sorted(client.scan_iter(match=keys.WORKER_PREFIX + "*", count=500))
    workers = []
    for raw in client.mget(names) if names else []:
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            workers.append(WorkerStatus.model_validate_json(raw))
        except ValidationError:
            continue  # a worker of another version: not ours to judge here
    return workers


def fleet_report(client: redis.Redis) -> FleetReport:
    """Workers alive now, and every render queue that has jobs or consumers."""
    workers = read_workers(client)
    names = known_queues(client)
    queues = []
    for name, waiting in zip(names, waiting_messages(client, names), strict=True):
        consumers = [w.node for w in workers if name in w.queues]
        adopters = [w.node for w in workers if serves(w.flux_model, w.level, name)] if split_lora_queue(name)[1] else []
        if waiting or consumers:
            queues.append(QueueStatus(name=name, waiting=int(waiting), consumers=consumers, adopters=adopters))
    return FleetReport(checked_at=datetime.now(UTC), workers=workers, queues=queues)
