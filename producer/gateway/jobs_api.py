"""`/v1/jobs`: submit jobs (one or a list) and read or wait for one job."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from fluxfarm.producer.client import FarmClient, JobOutcome
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.auth import Caller, check_datasets, check_priority
from fluxfarm.producer.gateway.errors import ApiError, error_responses
from fluxfarm.producer.gateway.state import farm_client, token_usage
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.datasets import JobState
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import RenderJob, parse_dataset_name, parse_job, parse_job_id, parse_jobs
from fluxfarm.shared.metadata import RenderResult
from fluxfarm.shared.models import FluxModel

MAX_JOBS_PER_POST = 1000
"""More at once is a dataset: POST /v1/datasets/{name}/files streams a file of any length."""
MAX_WAIT_S = 60.0
"""The longest a `wait` holds a request open; a client waiting longer asks again."""
_WAIT_POLL_S = 0.25

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 403, 404, 422, 429, 503, 507))


class JobRef(BaseModel):
    job_id: str
    dataset: str
    outcome: JobOutcome
    """enqueued, or found already stored, or already queued or running (not sent again)."""


class Submitted(BaseModel):
    """The jobs' ids, in the order sent, and what became of them: a job already stored or already queued
    or running is not sent again."""

    jobs: list[JobRef]
    enqueued: int
    already_stored: int
    already_waiting: int


class JobView(BaseModel):
    job_id: str
    dataset: str
    state: JobState
    result: RenderResult | None = None
    """The stored metadata, once the image is stored."""
    image_url: str | None = None
    """Fetches the PNG without credentials for an hour (presigned on S3)."""
    failure: str | None = None


def _parse_jobs(body: dict[str, Any] | list[Any], model: FluxModel) -> list[RenderJob]:
    """Every job of the body (`model` for those that name none), or InvalidJob naming each bad field as
    `<index>.<field>` in a list."""
    if not isinstance(body, list):
        return [parse_job(body, model)]
    if not body or len(body) > MAX_JOBS_PER_POST:
        raise InvalidJob(f"send 1 to {MAX_JOBS_PER_POST} jobs; a larger set is a dataset file upload")
    return parse_jobs(body, model)


@router.post("", status_code=202)
def submit_jobs(
    request: Request,
    record: Caller,
    body: Annotated[dict[str, Any] | list[Any], Body(description="One job, or a list of jobs (docs/jobs.md).")],
    priority: Priority = "normal",
) -> Submitted:
    """Validate every job (nothing is sent if one is bad), then enqueue those not already stored or waiting."""
    jobs = _parse_jobs(body, farm_client(request).settings.default_model)
    per_dataset = Counter(job.dataset for job in jobs)
    check_datasets(record, per_dataset)
    check_priority(record, priority)
    usage = token_usage(request)
    outcomes: dict[tuple[str, str], JobOutcome] = {}

    def note(job: RenderJob, outcome: JobOutcome) -> None:
        outcomes.setdefault((job.dataset, job.id), outcome)

    with usage.room_for(record, len(jobs)):
        counts = farm_client(request).for_tenant(record.name).submit_stream(jobs, priority=priority, on_outcome=note)
        usage.note_submitted(record.name, per_dataset, counts.enqueued)
    audit(
        farm_client(request).redis,
        "submit",
        record.name,
        datasets=dict(per_dataset),
        enqueued=counts.enqueued,
        priority=priority,
    )
    return Submitted(
        jobs=[JobRef(job_id=job.id, dataset=job.dataset, outcome=outcomes[(job.dataset, job.id)]) for job in jobs],
        enqueued=counts.enqueued,
        already_stored=counts.already_stored,
        already_waiting=counts.already_waiting,
    )


def _view(client: FarmClient, dataset: str, job_id: str) -> JobView:
    result = client.dataset_result(dataset, job_id)
    state = None if result is not None else client.datasets.job_state(dataset, job_id)
    if state == JobState.DONE:  # it finished between the two reads: stored before it was recorded done
        result = client.dataset_result(dataset, job_id)
    if result is not None:
        url = client.image_url(result)
        return JobView(job_id=job_id, dataset=dataset, state=JobState.DONE, result=result, image_url=url)
    if state is None:
        raise ApiError(404, "not_found", f"dataset {dataset}: no job {job_id}")
    failure = client.datasets.failure(dataset, job_id) if state == JobState.FAILED else None
    return JobView(job_id=job_id, dataset=dataset, state=state, failure=failure)


@router.get("/{job_id}")
async def read_job(
    request: Request,
    record: Caller,
    job_id: str,
    dataset: Annotated[str, Query(description="The job's dataset.")],
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for it to finish.")] = 0,
) -> JobView:
    """Where a job is; with `wait`, the answer comes when it is done, failed or cancelled, or when the wait
    is up (long-poll: the client asks again, no polling loop of its own). A waiting request holds no
    thread: each look runs on the thread pool, the pause between looks on the event loop, and a client
    that hangs up ends it."""
    parse_job_id(job_id)
    check_datasets(record, [parse_dataset_name(dataset)])
    client = farm_client(request)
    deadline = time.monotonic() + wait
    while True:
        view = await run_in_threadpool(_view, client, dataset, job_id)
        if view.state not in (JobState.QUEUED, JobState.RUNNING) or time.monotonic() >= deadline:
            return view
        if await request.is_disconnected():
            return view
        await asyncio.sleep(_WAIT_POLL_S)
