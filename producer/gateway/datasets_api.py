"""`/v1/datasets/{name}`: a dataset's record (counts, rate, ETA, failures), its results a page at a time,
and its cancel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from fluxfarm.producer.dataset_stream import FINISHED_PAGE
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.auth import Caller, check_datasets
from fluxfarm.producer.gateway.errors import ApiError, error_responses
from fluxfarm.producer.gateway.state import farm_client
from fluxfarm.shared.datasets import DatasetRecord
from fluxfarm.shared.jobs import parse_dataset_name, parse_job_id
from fluxfarm.shared.metadata import RenderResult

MAX_PAGE = 200

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=error_responses(401, 403, 404, 422),
)


class ResultView(BaseModel):
    job_id: str
    result: RenderResult | None
    """The stored metadata; None if it could not be read (a foreign or damaged object)."""
    image_url: str | None
    """Fetches the PNG without credentials for an hour (presigned on S3)."""


class ResultsPage(BaseModel):
    results: list[ResultView]
    next: str | None
    """Pass as `after` for the next page; None on the last."""


class Cancelled(BaseModel):
    dataset: str
    cancelled: int
    """Queued jobs dropped; running ones finish."""


def _dataset(record: Caller, name: str) -> str:
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    return dataset


class DatasetNames(BaseModel):
    datasets: list[str]


@router.get("")
def list_datasets(request: Request, record: Caller) -> DatasetNames:
    """The active datasets this token may see (every one, for an admin token)."""
    return DatasetNames(datasets=[name for name in farm_client(request).dataset_names() if record.grant.allows(name)])


@router.get("/{name}")
def read_dataset(request: Request, record: Caller, name: str) -> DatasetRecord:
    """The dataset's progress now, as `fluxfarm status --dataset` shows it: counts, rate, ETA, failures."""
    dataset = _dataset(record, name)
    found = farm_client(request).dataset_record(dataset)
    if found.created_at is None:
        raise ApiError(404, "not_found", f"no dataset {dataset}")
    return found


@router.get("/{name}/results")
def read_results(
    request: Request,
    record: Caller,
    name: str,
    after: Annotated[str | None, Query(description="The last job id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> ResultsPage:
    """The dataset's stored results in job id order, a page at a time: each job's metadata and a URL
    for its image. A page lists about one page of storage keys, however large the dataset."""
    dataset = _dataset(record, name)
    if after is not None:
        parse_job_id(after)
    client = farm_client(request)
    ids = client.store.stored_job_page(dataset, after, limit)

    def view(job_id: str) -> ResultView:
        result = client.dataset_result(dataset, job_id)
        return ResultView(job_id=job_id, result=result, image_url=client.image_url(result) if result else None)

    pool: ThreadPoolExecutor = request.app.state.pool
    return ResultsPage(results=list(pool.map(view, ids)), next=ids[-1] if len(ids) == limit else None)


class Finished(BaseModel):
    jobs: list[tuple[str, float]]
    """(job id, when it finished: seconds on the farm's clock), oldest first."""
    next_since: float | None = None
    """Where the next page starts when this one is full (`limit` jobs): the last job's time (jobs at that
    time come again; skip the ids already read). None: nothing more finished yet."""


@router.get("/{name}/finished")
def read_finished(
    request: Request,
    record: Caller,
    name: str,
    since: Annotated[float, Query(ge=0, description="Seconds on the farm's clock; 0: from the start.")] = 0,
    limit: Annotated[int, Query(ge=1, le=FINISHED_PAGE)] = FINISHED_PAGE,
) -> Finished:
    """The dataset's jobs done at or after `since`, oldest first, at most `limit`: what a client streaming a
    dataset's results asks for at each poll, with its last finishing time as the next `since`."""
    dataset = _dataset(record, name)
    jobs = farm_client(request).finished_since(dataset, since, limit)
    return Finished(jobs=jobs, next_since=jobs[-1][1] if len(jobs) == limit else None)


@router.post("/{name}/cancel")
def cancel_dataset(request: Request, record: Caller, name: str) -> Cancelled:
    """Drop the dataset's queued jobs (workers discard their messages unrendered); running ones finish."""
    dataset = _dataset(record, name)
    count = farm_client(request).cancel(dataset)
    audit(farm_client(request).redis, "cancel", record.name, dataset=dataset, cancelled=count)
    return Cancelled(dataset=dataset, cancelled=count)
