"""The worker's job runner in process, around an engine: a real Redis, a local store, one task thread per call
(`runner.run(payload)`), as tests of what a render writes (its metadata, its record) need it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.job_records import SentJob
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.local_store import LocalStore
from fluxfarm.shared.metadata import RenderResult, WorkerInfo
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.serve.calibration_cites import CalibrationCites
from fluxfarm.worker.serve.job_runner import JobRunner
from fluxfarm.worker.serve.leases import JobClaims
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.serve.result_store import ResultStore
from fluxfarm.worker.serve.retry_policy import RetryPolicy


@dataclass
class InProcessRunner:
    runner: JobRunner
    batcher: RenderBatcher
    book: DatasetBook

    def queue(self, *jobs: RenderJob) -> None:
        """Note `jobs` queued, as a producer leaves them."""
        for job in jobs:
            self.book.note_queued(job.dataset, [SentJob.of(job, 3, "2026-12-05T00:00:00+00:00", False)])

    def run(self, job: RenderJob) -> RenderResult:
        return self.runner.run(job.model_dump(mode="json"))


def in_process_runner(
    engine: RenderEngine,
    client: redis.Redis,
    out: Path,
    node: str,
    max_batch: int = 1,
    wait_s: float = 0.0,
    cites: CalibrationCites | None = None,
) -> InProcessRunner:
    """A job runner storing into `out`; close its `batcher` when done."""
    worker = WorkerInfo(node=node, hostname="here", device="cpu", gpu_name=None, vram_gib=None)
    book = DatasetBook(client)
    batcher = RenderBatcher(engine, max_batch, wait_s)
    runner = JobRunner(
        batcher,
        ResultStore(LocalStore(out), 1.0),
        book,
        JobClaims(client, node, 30.0),
        RetryPolicy(client, book, node, 3, 1.0, 60.0),
        worker,
        0.0,
        WorkerMetrics(),
        cites=cites,
    )
    return InProcessRunner(runner, batcher, book)
