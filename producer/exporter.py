"""`fluxfarm exporter`: the farm as Redis sees it (live workers, queues, datasets, dead letters, Redis'
own memory) as Prometheus metrics, read afresh at every scrape.

Workers serve their own process metrics (worker/serve/metrics.py); what no single worker knows (how many
jobs wait in each queue, how far each dataset is, which queue no live worker serves) comes from the
same records `fluxfarm status` reads, through this one small process beside Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fluxfarm.producer.redis_room import Room
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.producer.status import FarmStatus, read_status
from fluxfarm.shared.datasets import STATES
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.units import GIB

log = logging.getLogger(__name__)


class FarmCollector(Collector):
    """A Prometheus collector that reads the farm's status from Redis at each scrape."""

    def __init__(self, settings: ProducerSettings) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fluxfarm_broker_up", "1 when the exporter could read the farm from Redis.")
        try:
            status = read_status(self._settings)
        except FarmError as error:
            log.warning("scrape without the farm: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _fleet_metrics(status)
        yield from _dataset_metrics(status)
        if status.redis_memory is not None:
            yield from _memory_metrics(status.redis_memory)


def _fleet_metrics(status: FarmStatus) -> Iterator[Metric]:
    node_labels = ["node", "host", "gpu", "level"]
    alive = GaugeMetricFamily("fluxfarm_fleet_worker_up", "Workers whose heartbeat is fresh.", labels=node_labels)
    rate = GaugeMetricFamily(
        "fluxfarm_fleet_worker_images_per_hour", "Each worker's recent images per hour.", labels=["node", "level"]
    )
    peak = GaugeMetricFamily(
        "fluxfarm_fleet_worker_vram_peak_bytes", "Each GPU worker's peak GPU memory.", labels=["node", "gpu"]
    )
    for worker in status.fleet.workers:
        gpu = worker.gpu_name or "cpu"
        alive.add_metric([worker.node, worker.hostname, gpu, worker.level.value], 1)
        rate.add_metric([worker.node, worker.level.value], worker.images_per_hour or 0.0)
        if worker.vram_peak_gib is not None:
            peak.add_metric([worker.node, gpu], worker.vram_peak_gib * GIB)
    waiting = GaugeMetricFamily(
        "fluxfarm_queue_waiting", "Jobs waiting in each queue (all priorities).", labels=["queue", "constraint"]
    )
    consumers = GaugeMetricFamily("fluxfarm_queue_consumers", "Live workers consuming each queue.", labels=["queue"])
    for queue in status.fleet.queues:
        waiting.add_metric([queue.name, queue.constraint], queue.waiting)
        consumers.add_metric([queue.name], len(queue.consumers))
    yield from (alive, rate, peak, waiting, consumers)


def _dataset_metrics(status: FarmStatus) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("fluxfarm_dataset_jobs", "Jobs of each dataset by state.", labels=["dataset", "state"])
    rate = GaugeMetricFamily(
        "fluxfarm_dataset_jobs_per_hour", "Each dataset's recent finishing rate.", labels=["dataset"]
    )
    eta = GaugeMetricFamily(
        "fluxfarm_dataset_eta_seconds", "Seconds until each dataset has nothing queued or running.", labels=["dataset"]
    )
    for dataset in status.datasets:  # the active index: finished datasets leave it after FLUXFARM_DATASET_RETENTION_S
        record = dataset.record
        for state in STATES:
            jobs.add_metric([record.name, state], getattr(record, state))
        rate.add_metric([record.name], record.rate_per_hour or 0.0)
        if (seconds := record.eta_s) is not None:
            eta.add_metric([record.name], seconds)
    letters = GaugeMetricFamily("fluxfarm_dead_letters", "Dead letters kept in Redis (newest first, capped).")
    letters.add_metric([], status.dead_letter_count)
    yield from (jobs, rate, eta, letters)


def _memory_metrics(room: Room) -> Iterator[Metric]:
    used = GaugeMetricFamily("fluxfarm_redis_used_memory_bytes", "Redis' used_memory (INFO memory).")
    used.add_metric([], room.used_bytes)
    yield used
    if room.limit_bytes is not None:
        limit = GaugeMetricFamily(
            "fluxfarm_redis_maxmemory_bytes",
            "Redis' maxmemory, or FLUXFARM_REDIS_MAXMEMORY_MIB where Redis has none; past it every write fails.",
        )
        limit.add_metric([], room.limit_bytes)
        yield limit
    if room.measured:
        per_job = GaugeMetricFamily(
            "fluxfarm_redis_bytes_per_queued_job",
            "Bytes one queued job takes in Redis (its message and its dataset record, sampled with MEMORY USAGE).",
        )
        per_job.add_metric([], room.bytes_per_job)
        yield per_job


def run_exporter(settings: ProducerSettings, address: str, port: int) -> None:
    """Serve the farm's metrics until the process is stopped."""
    registry = CollectorRegistry()
    registry.register(FarmCollector(settings))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    log.info("farm metrics at http://%s:%d/metrics", address, server.server_port)
    while True:
        time.sleep(3600)
