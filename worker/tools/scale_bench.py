"""`fluxfarm bench-scale`: what the farm's periodic reads cost as Redis fills (issue 21, point 5): `fluxfarm
status`, one exporter scrape and one lost-job sweep, timed at each backlog (queued jobs of one dataset) and
each count of datasets, with Redis' memory; and the memory a dataset leaves once its jobs are done.

Runs on a private redis-server and a local store. Jobs go in through the real client (`submit_stream`, as
`fluxfarm submit FILE` sends them); the reads are the real ones (`read_status`, the exporter's collector, the
sweeper of every worker). A drain is the record's own moves (queued to running to done) and the message
taken off its queue, as render-free workers would do it, without their claims and acknowledgements (which
are gone once a job is done): bench-fleet measures those.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from pydantic import BaseModel

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.exporter import FarmCollector
from fluxfarm.producer.fleet_bench import bench_settings
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.producer.status import read_status
from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import queue_lists
from fluxfarm.shared.datasets import DatasetBook, JobState
from fluxfarm.shared.queue_registry import known_queues
from fluxfarm.worker.serve.lost_jobs import LostJobSweeper

BACKLOG_DATASET = "scale-backlog"
DRAIN_CHUNK = 1_000


class ScaleRow(BaseModel):
    """One farm state and what reading it cost."""

    queued_jobs: int
    datasets: int
    done_jobs: int
    redis_used_bytes: int
    submit_s: float
    status_s: float
    """`fluxfarm status` (every active dataset's record, the fleet, dead letters, Redis' memory)."""
    exporter_s: float
    """One Prometheus scrape of `fluxfarm exporter`."""
    sweep_s: float
    """One lost-job sweep, as the worker holding the sweep lock runs it."""
    sweep_complete: bool
    """False when the sweep gave up its round (queues past its scan bounds): nothing is resent then."""


def _timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def _jobs(dataset_count: int, per_dataset: int, prefix: str) -> list[dict[str, object]]:
    return [
        {"prompt": f"a lighthouse, study {i}", "dataset": f"{prefix}-{d}" if dataset_count > 1 else prefix, "seed": i}
        for d in range(dataset_count)
        for i in range(per_dataset)
    ]


def _measure(client: redis.Redis, settings: ProducerSettings, queued: int, datasets: int, submit_s: float) -> ScaleRow:
    book = DatasetBook(client)
    status_s, _ = _timed(lambda: read_status(settings))
    exporter_s, _ = _timed(lambda: list(FarmCollector(settings).collect()))
    sweeper = LostJobSweeper(client, book, lambda sent: None, grace_s=3600.0, interval_s=1.0)
    client.delete(keys.LOST_JOBS_LOCK)
    sweep_s, _ = _timed(sweeper.sweep_once)
    complete = sweeper.message_ids() is not None
    done = sum(int(client.scard(keys.dataset(name, JobState.DONE))) for name in book.names())
    return ScaleRow(
        queued_jobs=queued,
        datasets=datasets,
        done_jobs=done,
        redis_used_bytes=int(client.info("memory")["used_memory"]),
        submit_s=submit_s,
        status_s=status_s,
        exporter_s=exporter_s,
        sweep_s=sweep_s,
        sweep_complete=complete,
    )


def drain(client: redis.Redis, dataset: str) -> int:
    """Take every queued job of `dataset` off its queue and record it done (the record's own moves);
    returns how many."""
    book = DatasetBook(client)
    lists = [name for queue in known_queues(client) for name in queue_lists(queue)]
    for name in lists:
        client.delete(name)
    ids = [member.decode() for member in client.sscan_iter(keys.dataset(dataset, JobState.QUEUED), count=DRAIN_CHUNK)]
    for job_id in ids:
        book.mark_running(dataset, job_id)
        book.mark_done(dataset, job_id, "fp8", gpu_s=1.0)
    return len(ids)


def run_scale_bench(backlogs: list[int], dataset_counts: list[int], on_row: Callable[[ScaleRow], None]) -> None:
    """A row per backlog (one dataset of that many queued jobs; after the largest, the same once drained)
    and per dataset count (that many datasets of one queued job each), each on a fresh Redis."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for index, backlog in enumerate(sorted(backlogs)):
            with RedisServer(folder / f"redis-backlog-{index}") as server:
                settings = bench_settings(server.url, folder / f"store-{index}")
                client = redis.Redis.from_url(server.url)
                with FarmClient(settings) as farm:
                    submit_s, _ = _timed(lambda farm=farm, n=backlog: farm.submit_stream(_jobs(1, n, BACKLOG_DATASET)))
                on_row(_measure(client, settings, backlog, 1, submit_s))
                if backlog == max(backlogs):
                    drained = drain(client, BACKLOG_DATASET)
                    on_row(_measure(client, settings, backlog - drained, 1, 0.0))
                client.close()
        for index, count in enumerate(sorted(dataset_counts)):
            with RedisServer(folder / f"redis-datasets-{index}") as server:
                settings = bench_settings(server.url, folder / f"store-datasets-{index}")
                client = redis.Redis.from_url(server.url)
                with FarmClient(settings) as farm:
                    submit_s, _ = _timed(lambda farm=farm, n=count: farm.submit_stream(_jobs(n, 1, "scale")))
                on_row(_measure(client, settings, count, count, submit_s))
                client.close()
